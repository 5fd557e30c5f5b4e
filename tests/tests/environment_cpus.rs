//! `kindling serve --environment-cpus` on the process backend: an environment runs on
//! Lambda's vCPU count for its memory (1 per 1,769 MB), on the least used of the agent's
//! CPUs; `all` leaves every CPU to every environment. The functions report the CPUs they may
//! run on (`Cpus_allowed_list` of their own process).

use std::collections::BTreeSet;

use kindling_tests::{shell_bootstrap, Agent, AgentOptions};
use serde_json::{json, Value};

/// `0-2,5` -> {0, 1, 2, 5}.
fn cpu_list(s: &str) -> BTreeSet<usize> {
    let mut set = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => set.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => {
                set.insert(part.parse().unwrap());
            }
        }
    }
    set
}

/// The CPUs this test (and so the agent it starts) may run on.
fn own_cpus() -> BTreeSet<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    cpu_list(line)
}

/// Answers `{"cpus": "<Cpus_allowed_list>"}` after sleeping the event's seconds.
fn create_reporter(agent: &Agent, name: &str, memory: u32) {
    let code = shell_bootstrap(
        r#"SECS=$(printf '%s' "$EVENT" | tr -cd '0-9')
  if [ -n "$SECS" ]; then sleep "$SECS"; fi
  CPUS=$(grep Cpus_allowed_list /proc/self/status | cut -f2)
  respond "{\"cpus\":\"$CPUS\"}""#,
    );
    agent.create_ok(
        name,
        "provided.al2023",
        "bootstrap",
        &code,
        json!({"Timeout": 30, "MemorySize": memory}),
    );
}

fn cpus_of(agent: &Agent, name: &str, event: &[u8]) -> BTreeSet<usize> {
    let r = agent.invoke(name, event);
    assert_eq!(r.status, 200, "{}; log:\n{}", r.text(), agent.log());
    let v: Value = r.json();
    cpu_list(v["cpus"].as_str().expect("cpus"))
}

#[test]
fn environments_get_the_vcpus_of_their_memory_on_the_least_used_cpus() {
    let host = own_cpus();
    let agent = Agent::start();
    create_reporter(&agent, "small", 128);
    create_reporter(&agent, "large", 3008);

    // Two 128 MB environments at once (the first is busy for 2 s when the second is asked
    // for): one CPU each, different ones when the host has two or more.
    let (a, b) = std::thread::scope(|s| {
        let first = s.spawn(|| cpus_of(&agent, "small", b"2"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let second = s.spawn(|| cpus_of(&agent, "small", b"0"));
        (first.join().unwrap(), second.join().unwrap())
    });
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(
        a.is_subset(&host) && b.is_subset(&host),
        "{a:?} {b:?} {host:?}"
    );
    if host.len() >= 2 {
        assert_ne!(a, b, "two environments on one CPU while another is free");
    }

    // 3,008 MB buys two vCPUs on Lambda.
    let large = cpus_of(&agent, "large", b"0");
    assert_eq!(large.len(), host.len().min(2), "{large:?}");
    assert!(large.is_subset(&host), "{large:?} {host:?}");
}

#[test]
fn environment_cpus_all_shares_every_cpu() {
    let host = own_cpus();
    let agent = Agent::start_with(AgentOptions {
        extra_args: vec!["--environment-cpus".into(), "all".into()],
        ..Default::default()
    });
    create_reporter(&agent, "small", 128);
    assert_eq!(cpus_of(&agent, "small", b"0"), host);
}
