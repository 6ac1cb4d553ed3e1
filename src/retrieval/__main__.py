"""`python -m retrieval ...` is the `retrieval` console script (see retrieval.cli)."""

from retrieval.cli import main

main()
