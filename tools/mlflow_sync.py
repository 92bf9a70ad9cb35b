"""Send the metrics a run could not deliver to MLflow (tracking server down when its job ended).

See pemt/apps/mlflow_sync.py (installed: `pemt-mlflow-sync`)."""

import sys

from pemt.apps.mlflow_sync import main

if __name__ == "__main__":
    sys.exit(main())
