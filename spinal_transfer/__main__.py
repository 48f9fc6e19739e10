import sys

try:                                 # Ctrl-C while the command line is imported (it may import torch)
    from .cli import entry
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
entry()
