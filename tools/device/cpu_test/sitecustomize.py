"""CPU rehearsal of the device job: make the project venv look like the device image.

Put this folder first on PYTHONPATH (job.sh does when DEVICE_IMITATE=1). Packages that the device image
lacks cannot be imported (ImportError, as there); SimpleITK resolves only to tools/device/shim, and monai
only to the wheel that job.sh installs into its --target folder, never to the venv's copies.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

ABSENT = {
    "mlflow",
    "great_expectations",
    "kfp",
    "kfp_kubernetes",
    "dvc",
    "dvc_s3",
    "boto3",
    "botocore",
    "moto",
    "click",
}  # click is on the device, but no stage may need the CLI
ONLY_FROM = {
    "SimpleITK": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shim"),
    "monai": os.environ.get("DEVICE_SITE", "/tmp/site"),
}


class _DeviceImitation:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ABSENT:
            raise ImportError(f"{top} is not installed on the device (blocked by {__file__})")
        if top in ONLY_FROM and name == top:
            spec = importlib.machinery.PathFinder.find_spec(name, [ONLY_FROM[top]])
            if spec is None:
                raise ImportError(f"{top}: only {ONLY_FROM[top]} may provide it (blocked by {__file__})")
            return spec
        return None


sys.meta_path.insert(0, _DeviceImitation())
