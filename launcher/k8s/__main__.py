"""`python -m launcher.k8s ...`, as the fleet-controller Deployment's command and probes run it."""

import sys

from launcher.k8s.cli import main

sys.exit(main())
