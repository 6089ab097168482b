"""KFP pipelines of covseg: `train_pipeline` (the graph, compiled to `train_pipeline.yaml`, checked by
tests/test_pipeline.py) and `runner` (compile it, or run it here with kfp.local)."""
