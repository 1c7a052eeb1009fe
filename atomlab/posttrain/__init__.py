"""Post-training: supervised fine-tuning and RL with verifiable rewards on atomlab environments."""
