"""KFP pipelines of covseg: `training` (compiled to `training.yaml`, checked by tests/test_pipeline.py)."""
