"""`python -m producer`: the producer's command line."""

from producer.cli import main

raise SystemExit(main())
