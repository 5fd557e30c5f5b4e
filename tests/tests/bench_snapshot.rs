//! `kindling bench snapshot --runs 1 --json` end to end: real guest kernel boots, a snapshot,
//! restores with and without working-set prefetch. No timing assertions: only that every
//! phase ran and reported, and that prefetch cut the page faults after restore (counts).
//! Needs KVM; two guest kernel boots (10-45 s each on an emulating host).

use std::process::Command;

use kindling_tests::{have_kvm, workspace_bin};
use serde_json::Value;

#[test]
fn bench_snapshot_runs_and_reports() {
    if !have_kvm("bench snapshot") {
        return;
    }
    let out = Command::new(workspace_bin("kindling"))
        .args(["bench", "snapshot", "--runs", "1", "--json"])
        .output()
        .expect("run kindling bench snapshot");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stderr}",
        out.status
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(r["runs"], 1);
    assert_eq!(
        r["emulating_kvm"],
        r["host_kvm"]["kind"] == "emulated",
        "{r}"
    );
    let configs = r["configs"].as_array().expect("configs");
    assert_eq!(configs.len(), 1, "{r}");
    let c = &configs[0];
    assert_eq!(
        (c["mem_mib"].as_u64(), c["vcpus"].as_u64()),
        (Some(128), Some(1))
    );

    // The snapshot: a full-size sparse memory file and a state file.
    let s = &c["snapshot"];
    assert_eq!(s["memory_bytes"], 128u64 << 20, "{s}");
    let allocated = s["memory_allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated > 0 && allocated < 128 << 20,
        "zero pages are holes: {s}"
    );
    assert!(s["state_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["create_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert!(c["working_set_read_pages"].as_u64().unwrap() > 0, "{c}");
    assert!(c["working_set_written_pages"].as_u64().unwrap() > 0, "{c}");

    // Every series has its one run with the figures filled in.
    for name in ["cold_boot", "restore", "restore_prefetch"] {
        let runs = c[name]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 1, "{name}: {c}");
        let run = &runs[0];
        let (vcpus, answer) = (
            run["vcpus_running_ms"].as_f64().unwrap(),
            run["answer_ms"].as_f64().unwrap(),
        );
        assert!(vcpus > 0.0 && answer > vcpus, "{name}: {run}");
        assert!(run["minor_faults"].as_u64().unwrap() > 0, "{name}: {run}");
    }
    assert!(c["restore"]["runs"][0]["prefetch_ms"].is_null(), "{c}");
    assert!(
        c["restore_prefetch"]["runs"][0]["prefetch_ms"]
            .as_f64()
            .is_some(),
        "{c}"
    );
    let faults = |name: &str| {
        let run = &c[name]["runs"][0];
        run["minor_faults"].as_u64().unwrap() + run["major_faults"].as_u64().unwrap()
    };
    assert!(
        faults("restore_prefetch") < faults("restore"),
        "prefetch did not cut faults: {c}"
    );
    assert!(
        c["prefetch_fault_reduction_pct"].as_f64().unwrap() > 0.0,
        "{c}"
    );
    assert!(c["boot_over_restore"].as_f64().unwrap() > 0.0, "{c}");
}
