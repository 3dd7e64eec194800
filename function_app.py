"""Azure Functions entry point: the FunctionApp and its blueprint, nothing else."""

import azure.functions as func

from scep import config
from scep.functions import bp

config.settings()  # a wrong setting stops the app at start, with a message naming it

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(bp)
