"""Train and evaluate a RecBole sequential model with recbole_llmser, e.g.

    python run_recbole_llmser.py --model=SASRec --dataset=amazon-beauty --epochs=5
"""

import sys

from recbole_llmser.cli import main

if __name__ == "__main__":
    sys.exit(main())
