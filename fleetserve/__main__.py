"""`python -m fleetserve` runs the `fleetserve` command."""

from fleetserve.cli import main

if __name__ == "__main__":
    main()
