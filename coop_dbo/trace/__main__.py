"""``python -m coop_dbo.trace --demo``: print the trace of a real demo step."""

from . import main

main()
