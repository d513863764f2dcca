"""ptft: config-driven pre-training and fine-tuning of language models.

Importing ptft is cheap: torch and transformers are imported inside the commands that need them,
so `ptft --help` and `ptft config` start fast.
"""

__version__ = "0.1.0"
