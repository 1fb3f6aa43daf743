"""`python -m dilatequant` (and `torchrun -m dilatequant`): the command line."""

from dilatequant.tools.cli import main

main()
