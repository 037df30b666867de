//! The markdown table of a report.

use serde_json::Value;

pub(crate) fn markdown(r: &Value) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("| {k} | {v} |\n"));
    let f = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let lat = |l: &Value| {
        format!(
            "{} / {} / {} / {} s",
            f(&l["p50_s"]),
            f(&l["p95_s"]),
            f(&l["p99_s"]),
            f(&l["max_s"])
        )
    };
    row("Mode", f(&r["mode"]));
    let p = &r["params"];
    row("Server", f(&p["server"]));
    row(
        "Databases / active / seconds",
        format!("{} / {} / {}", p["dbs"], p["active"], p["seconds"]),
    );
    row(
        "Documents per write (burst)",
        format!("{} ({})", p["docs_per_write"], f(&p["burst"])),
    );
    row(
        "Spiegel processes / concurrency",
        format!("{} / {}", p["spiegel_processes"], f(&p["concurrency"])),
    );
    row("Replication engine", f(&p["replication_engine"]));
    row("Only one role", f(&p["only"]));
    row("CPUs", f(&p["cpus"]));
    let t = &r["timing"];
    row(
        "Create databases / ready / load / drain",
        format!(
            "{} / {} / {} / {} s",
            t["create_dbs_s"], t["ready_s"], t["load_s"], t["drain_s"]
        ),
    );
    row(
        "Writes (errors)",
        format!("{} ({})", r["writes"], r["write_errors"]),
    );
    row(
        "Replication p50 / p95 / p99 / max",
        lat(&r["replication"]["latency"]),
    );
    row("Replicated docs missing", f(&r["replication"]["missing"]));
    if !r["delivery"].is_null() {
        let d = &r["delivery"];
        row("Delivery p50 / p95 / p99 / max", lat(&d["latency"]));
        let t = &d["throughput"];
        row(
            "Delivered changes per second / API requests",
            format!("{} / {}", f(&t["changes_per_second"]), f(&t["requests"])),
        );
        let h = &r["hanging_endpoint"];
        if !h.is_null() {
            let without = lat(&h["healthy_without_broken"]);
            row("Healthy API, no broken one: p50 / p95 / p99 / max", without);
            let with = lat(&h["healthy_with_broken"]);
            row("Healthy API, one hanging: p50 / p95 / p99 / max", with);
            row("Healthy API p99, with / without", f(&h["p99_ratio"]));
            let accepted = f(&h["connections_to_the_hanging_api"]);
            row("Connections the hanging API accepted", accepted);
        }
        let o = &r["outage"];
        if !o.is_null() {
            let rss = &o["max_sampled_rss_mb"];
            row(
                "API outage: kind, seconds / requests refused",
                format!(
                    "{}, {} s / {}",
                    o["kind"], o["seconds"], o["refused_requests"]
                ),
            );
            row(
                "Spiegel max sampled RSS before / during / after the outage",
                format!(
                    "{} / {} / {} MB",
                    rss["before"], rss["during"], rss["after"]
                ),
            );
            row(
                "Writes during the outage / delivered, all within (s after it)",
                format!(
                    "{} / {}, {}",
                    o["writes_during"],
                    o["delivered_of_those"],
                    f(&o["all_delivered_s_after_it_ended"])
                ),
            );
            row(
                "Their delivery p50 / p95 / p99 / max",
                lat(&o["their_latency"]),
            );
        }
        row(
            "Deliveries missing / duplicate / unexpected",
            format!(
                "{} / {} / {}",
                d["missing"], d["duplicates"], d["unexpected"]
            ),
        );
    }
    if !r["spiegel"].is_null() {
        let s = &r["spiegel"];
        row(
            "Spiegel peak RSS (sum of VmHWM) / max sampled",
            format!("{} / {} MB", s["peak_rss_mb"], s["max_sampled_rss_mb"]),
        );
        row(
            "Spiegel CPU: load+drain / idle window / whole run",
            format!(
                "{} / {} ({} s) / {} s",
                s["cpu_s_load"], s["cpu_s_idle"], s["idle_seconds"], s["cpu_s_total"]
            ),
        );
        row(
            "Spiegel TCP connections to CouchDB: all processes / one process (max)",
            format!(
                "{} / {}",
                s["max_connections_to_couchdb"], s["max_connections_to_couchdb_per_process"]
            ),
        );
        let t = &s["time_spent"];
        for (name, key) in [
            ("Replicator", "replicator"),
            ("Change-listener", "change_listener"),
        ] {
            let r = &t[key];
            row(
                &format!("{name}: runs / mean wait update-to-run / mean run"),
                format!(
                    "{} / {} / {} s",
                    r["runs"],
                    f(&r["mean_update_to_run_s"]),
                    f(&r["mean_run_s"])
                ),
            );
        }
        for (name, key) in [
            ("POST _replicate", "post_replicate"),
            ("GET db/_changes", "get_changes"),
        ] {
            let o = &t[key];
            row(
                &format!("{name}: requests / mean"),
                format!("{} / {} s", o["requests"], f(&o["mean_s"])),
            );
        }
        row(
            "Spiegel-database writes (per update)",
            format!(
                "{} ({})",
                s["spiegel_db_writes"], s["spiegel_db_writes_per_update"]
            ),
        );
    }
    if !r["server"].is_null() {
        let s = &r["server"];
        row(
            "Server CPU: load+drain / idle window",
            format!("{} / {} s", f(&s["cpu_s_load"]), f(&s["cpu_s_idle"])),
        );
        row("Server peak RSS", format!("{} MB", f(&s["peak_rss_mb"])));
        row(
            "Server TCP connections: all / to itself (max)",
            format!(
                "{} / {}",
                s["max_established_connections"], s["max_connections_to_itself"]
            ),
        );
    }
    if !r["baseline_jobs"].is_null() {
        row("Baseline jobs by scheduler state", f(&r["baseline_jobs"]));
    }
    row("Complete", f(&r["complete"]));
    format!("| Figure | Value |\n|---|---|\n{out}")
}
