//! Container image functions: the image's start-up config (written by `rootfs::image` at
//! [`IMAGE_CONFIG_PATH`]) plus the function's `ImageConfig` overrides become the runtime's
//! command line, environment and working directory, the way Lambda treats a container image:
//!
//! - argv = ENTRYPOINT ++ CMD, each replaced by its override when the function sets one
//!   (Docker's rule; Lambda passes CMD to the entrypoint as the handler);
//! - `_HANDLER` = the first CMD word when there is one;
//! - environment: the image's ENV underneath Lambda's variables and the function's, except
//!   that the image's `PATH` is kept (the host's default `PATH` is Lambda's layout, which an
//!   arbitrary image does not have);
//! - working directory: the override, else WORKDIR, else `/` (as `docker run` does).

use std::collections::BTreeMap;
use std::path::Path;

use rapid_api::ErrorReport;
use serde::Deserialize;

/// Where every Kindling root image keeps its start-up config.
pub const IMAGE_CONFIG_PATH: &str = "/etc/kindling/image.json";

/// Largest image config read (it holds a few lists of strings).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The part of the image's start-up config guest-init uses (other fields are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageStart {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
}

/// The function's `ImageConfig`: each field, when set, replaces the image's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides<'a> {
    pub entrypoint: Option<&'a [String]>,
    pub command: Option<&'a [String]>,
    pub working_dir: Option<&'a str>,
}

/// How to start an image's runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
}

fn bad_image(msg: String) -> ErrorReport {
    ErrorReport::platform("Runtime.InvalidEntrypoint", msg)
}

/// Reads the image's start-up config; a missing or malformed file is the image's fault.
pub fn read(path: &Path) -> Result<ImageStart, ErrorReport> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| {
        bad_image(format!(
            "this image has no start-up config at {} ({e}): build it with `kindling image build`",
            path.display()
        ))
    })?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad_image(format!("cannot read {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(bad_image(format!(
            "{} is over {MAX_CONFIG_BYTES} bytes",
            path.display()
        )));
    }
    serde_json::from_str(&text).map_err(|e| {
        bad_image(format!(
            "{} is not a valid image config: {e}",
            path.display()
        ))
    })
}

/// Puts the image config, the overrides and the environment from the host together.
pub fn launch(
    image: &ImageStart,
    overrides: &Overrides<'_>,
    host_env: &BTreeMap<String, String>,
) -> Result<Launch, ErrorReport> {
    let entrypoint = overrides.entrypoint.unwrap_or(&image.entrypoint);
    let cmd = overrides.command.unwrap_or(&image.cmd);
    let argv: Vec<String> = entrypoint.iter().chain(cmd.iter()).cloned().collect();
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(bad_image(
            "the image has neither an ENTRYPOINT nor a CMD, and the function's ImageConfig sets none"
                .into(),
        ));
    }
    let mut env = BTreeMap::new();
    for entry in &image.env {
        match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.to_string(), v.to_string());
            }
            // Docker ignores entries without '='; so does Lambda's image loader.
            _ => {}
        }
    }
    let image_path = env.get("PATH").cloned();
    env.extend(host_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(p) = image_path {
        env.insert("PATH".into(), p);
    }
    match cmd.first() {
        Some(handler) => env.insert("_HANDLER".into(), handler.clone()),
        None => env.remove("_HANDLER"),
    };
    let working_dir = match overrides.working_dir {
        Some(d) if !d.is_empty() => d.to_string(),
        _ if !image.working_dir.is_empty() => image.working_dir.clone(),
        _ => "/".to_string(),
    };
    Ok(Launch {
        argv,
        env,
        working_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> ImageStart {
        ImageStart {
            entrypoint: strings(&["/lambda-entrypoint.sh"]),
            cmd: strings(&["app.handler"]),
            env: strings(&[
                "PATH=/image/bin:/usr/bin",
                "FOO=image",
                "BARE",
                "=x",
                "EMPTY=",
            ]),
            working_dir: "/var/task".into(),
        }
    }

    #[test]
    fn entrypoint_and_cmd_make_the_command_line() {
        let host: BTreeMap<_, _> = [
            ("PATH".to_string(), "/lambda/path".to_string()),
            ("FOO".to_string(), "function".to_string()),
            ("_HANDLER".to_string(), String::new()),
        ]
        .into();
        let l = launch(&image(), &Overrides::default(), &host).unwrap();
        assert_eq!(l.argv, strings(&["/lambda-entrypoint.sh", "app.handler"]));
        assert_eq!(l.working_dir, "/var/task");
        // The function's variables win, except the image's PATH.
        assert_eq!(l.env["FOO"], "function");
        assert_eq!(l.env["PATH"], "/image/bin:/usr/bin");
        assert_eq!(l.env["EMPTY"], "");
        assert_eq!(l.env["_HANDLER"], "app.handler");
        assert!(!l.env.contains_key("BARE"));
        assert!(!l.env.contains_key(""));
    }

    #[test]
    fn overrides_replace_each_part() {
        let ep = strings(&["/bin/sh", "-c"]);
        let cmd = strings(&["exec /app/run"]);
        let o = Overrides {
            entrypoint: Some(&ep),
            command: Some(&cmd),
            working_dir: Some("/app"),
        };
        let l = launch(&image(), &o, &BTreeMap::new()).unwrap();
        assert_eq!(l.argv, strings(&["/bin/sh", "-c", "exec /app/run"]));
        assert_eq!(l.working_dir, "/app");
        assert_eq!(l.env["_HANDLER"], "exec /app/run");
        // An empty override list is an override too (Docker's `--entrypoint ""`).
        let empty: Vec<String> = Vec::new();
        let o = Overrides {
            entrypoint: Some(&empty),
            ..Overrides::default()
        };
        let l = launch(&image(), &o, &BTreeMap::new()).unwrap();
        assert_eq!(l.argv, strings(&["app.handler"]));
    }

    #[test]
    fn an_image_without_a_command_is_an_entrypoint_error() {
        let img = ImageStart::default();
        let e = launch(&img, &Overrides::default(), &BTreeMap::new()).unwrap_err();
        assert_eq!(e.error_type, "Runtime.InvalidEntrypoint");
        assert!(String::from_utf8_lossy(&e.body).contains("neither an ENTRYPOINT nor a CMD"));
        // Without WORKDIR the command runs in `/`, and no CMD means no _HANDLER.
        let img = ImageStart {
            entrypoint: strings(&["/init"]),
            ..ImageStart::default()
        };
        let host: BTreeMap<_, _> = [("_HANDLER".to_string(), "x".to_string())].into();
        let l = launch(&img, &Overrides::default(), &host).unwrap();
        assert_eq!(l.working_dir, "/");
        assert!(!l.env.contains_key("_HANDLER"));
    }

    #[test]
    fn reading_reports_missing_and_malformed_configs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read(&dir.path().join("image.json")).unwrap_err();
        assert_eq!(missing.error_type, "Runtime.InvalidEntrypoint");
        let p = dir.path().join("bad.json");
        std::fs::write(&p, b"{not json").unwrap();
        let bad = read(&p).unwrap_err();
        assert!(String::from_utf8_lossy(&bad.body).contains("not a valid image config"));
        let p = dir.path().join("good.json");
        std::fs::write(
            &p,
            br#"{"version":1,"source":"oci","entrypoint":["/a"],"cmd":[],"env":["X=1"],"working_dir":"","user":""}"#,
        )
        .unwrap();
        let good = read(&p).unwrap();
        assert_eq!(good.entrypoint, strings(&["/a"]));
        assert_eq!(good.env, strings(&["X=1"]));
    }
}
