"""hello-python: the bundled Python example, served by awslambdaric.

Invoke with {"name": "..."} for a greeting; {"fail": "message"} raises, to show
Lambda's function-error path (X-Amz-Function-Error: Unhandled).
"""

import os


def handler(event, context):
    if isinstance(event, dict) and "fail" in event:
        raise ValueError(str(event["fail"]))
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    return {
        "message": f"Hello, {name}!",
        "requestId": context.aws_request_id,
        "functionName": context.function_name,
        "memoryLimitInMB": context.memory_limit_in_mb,
        "remainingTimeMs": context.get_remaining_time_in_millis(),
        "region": os.environ.get("AWS_REGION"),
    }
