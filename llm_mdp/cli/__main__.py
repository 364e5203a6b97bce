"""``python -m llm_mdp.cli`` (and ``torchrun -m llm_mdp.cli``): the ``llm-mdp`` command."""

import sys

from llm_mdp.cli import main

sys.exit(main())
