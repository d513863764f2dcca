"""`python -m ptft` works like the `ptft` command (and is what torchrun launches)."""

from ptft.cli import main

if __name__ == "__main__":
    main()
