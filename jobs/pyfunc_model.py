"""The code MLflow runs to load the registered deepfill model ("models from code").

``jobs.serving.log_inpaint_model`` logs this file (a copy lands in the model folder as ``pyfunc_model.py``)
instead of a pickled object; ``mlflow.pyfunc.load_model`` executes it. It only instantiates the class of
the installed project (the weights are the model's ``checkpoint`` artifact, read by ``load_context`` with
``torch.load(weights_only=True)``). Not meant to be imported by anything else.
"""

from mlflow.models import set_model

from jobs.serving import InpaintModel

set_model(InpaintModel())
