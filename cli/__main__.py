"""``python -m tideflow.cli ...`` is the ``tideflow`` command."""

from tideflow.cli import main

raise SystemExit(main())
