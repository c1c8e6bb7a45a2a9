from experiments.gpu_evidence.cli import main

raise SystemExit(main())
