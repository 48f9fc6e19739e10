"""Many runs at once: compare heads, tune, reproduce the paper, and their shared multi-run rules."""
