# The "Machine Learning" dashboard of stackml (stackml_dashboard).
from service.client import ClientError

DASHBOARD = "machine_learning"
DISABLED = False
ADD_INSTALLED_APPS = ["stackml_dashboard"]
# an unreachable or refusing API is a message on the page, never a server error
ADD_EXCEPTIONS = {"recoverable": (ClientError,)}
