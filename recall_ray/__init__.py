"""recall-ray: RECALL (arXiv 2510.20479) layer-wise, representation-aligned merging of
fine-tuned LLMs, as batch jobs on Ray."""

__version__ = "0.1.0"
