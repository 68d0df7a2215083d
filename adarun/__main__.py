"""`python -m adarun`: the same command as `adarun`."""

from jobs.cli import main

main()
