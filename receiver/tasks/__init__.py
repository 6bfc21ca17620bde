"""Built-in downstream tasks (``--task save|classify|jsonl|publish``); see ``docs/RECEIVER.md``."""
