"""`spinal-transfer prepare` (its options live with the dataset definitions in spinal_transfer.data.prepare)."""
from ..data.prepare import EXAMPLES, add_args, main

__all__ = ["EXAMPLES", "add_args", "main"]
