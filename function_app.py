"""Azure Functions entry point: the FunctionApp and its blueprint, nothing else."""

import azure.functions as func

from scep import config, logs
from scep.http.functions import bp

# A wrong setting stops the app at start, with a message naming it; from here on every record of the product's
# loggers is cleaned of control characters before the worker's handler ships it to the host.
logs.install(config.log_level(config.settings()))
config.configure_telemetry(config.settings())  # once per worker process: Application Insights when connected

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(bp)
