"""Fine-tune and evaluate on a downstream task: see pemt/apps/finetune.py (installed: `pemt-finetune`).

python launch/finetune.py [overrides...]
"""

from pemt.apps.finetune import main

if __name__ == "__main__":
    main()
