"""Evaluation shared by the stages: QA accuracy with or without retrieval, and held-out loss."""
