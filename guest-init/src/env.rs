//! The environment a Lambda runtime sees.

use std::collections::BTreeMap;

use crate::proto::{Configure, RuntimeKind};

/// Lambda's `PATH` inside an execution environment.
pub const LAMBDA_PATH: &str = "/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin";

/// Lambda's own variables for `cfg` (not the function's): what the host puts into
/// [`Configure::environment`] before adding the function's variables, the same set the
/// process backend gives a runtime. `tmp_dir` is `TMPDIR` and `HOME`; `log_stream` the
/// `AWS_LAMBDA_LOG_STREAM_NAME` (the host makes it: it knows the date and the environment id).
/// `AWS_LAMBDA_RUNTIME_API` is not among them: guest-init sets it.
pub fn lambda_variables(
    cfg: &Configure,
    tmp_dir: &str,
    log_stream: &str,
) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut put = |k: &str, val: &str| {
        v.insert(k.to_string(), val.to_string());
    };
    put("PATH", LAMBDA_PATH);
    put("LANG", "en_US.UTF-8");
    put("TZ", ":UTC");
    put("HOME", tmp_dir);
    put("TMPDIR", tmp_dir);
    put("_HANDLER", &cfg.handler);
    put("LAMBDA_TASK_ROOT", &cfg.task_root);
    put("LAMBDA_RUNTIME_DIR", &cfg.task_root);
    put("AWS_REGION", &cfg.region);
    put("AWS_DEFAULT_REGION", &cfg.region);
    put("AWS_LAMBDA_FUNCTION_NAME", &cfg.function_name);
    put(
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        &cfg.memory_mb.to_string(),
    );
    put("AWS_LAMBDA_FUNCTION_VERSION", &cfg.function_version);
    put(
        "AWS_LAMBDA_LOG_GROUP_NAME",
        &format!("/aws/lambda/{}", cfg.function_name),
    );
    put("AWS_LAMBDA_LOG_STREAM_NAME", log_stream);
    put("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand");
    if let RuntimeKind::Python { .. } = cfg.runtime {
        // The only Python runtime Kindling has; a later one passes its own.
        put("AWS_EXECUTION_ENV", "AWS_Lambda_python3.11");
        put("PYTHONUNBUFFERED", "1");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RuntimeKind;

    #[test]
    fn lambda_variables_follow_the_configuration() {
        let cfg = Configure {
            function_name: "hello".into(),
            function_version: "$LATEST".into(),
            handler: "app.handler".into(),
            memory_mb: 256,
            timeout_ms: 3000,
            region: "eu-west-1".into(),
            runtime: RuntimeKind::Python {
                interpreter: "python3".into(),
            },
            task_root: "/var/task".into(),
            environment: BTreeMap::new(),
            init_timeout_ms: 10_000,
            run_as: None,
            hostname: None,
            host_time_ms: None,
            entropy_hex: None,
        };
        let v = lambda_variables(&cfg, "/tmp", "2026/01/01/[$LATEST]abc");
        assert_eq!(v["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "256");
        assert_eq!(v["AWS_LAMBDA_LOG_GROUP_NAME"], "/aws/lambda/hello");
        assert_eq!(v["_HANDLER"], "app.handler");
        assert_eq!(v["AWS_DEFAULT_REGION"], "eu-west-1");
        assert_eq!(v["AWS_EXECUTION_ENV"], "AWS_Lambda_python3.11");
        assert_eq!(v["TMPDIR"], "/tmp");
        assert!(!v.contains_key("AWS_LAMBDA_RUNTIME_API"));
        let provided = Configure {
            runtime: RuntimeKind::Provided,
            ..cfg
        };
        assert!(!lambda_variables(&provided, "/tmp", "s").contains_key("AWS_EXECUTION_ENV"));
    }
}
