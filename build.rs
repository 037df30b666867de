//! Tells the integration tests which CouchDB they run against, so that a
//! test the chosen server cannot host is reported as ignored (skipped) by
//! the test runner instead of passing without testing anything.
//!
//! `SPIEGEL_TEST_SERVER`: `test-server` (default), `kit` (a real CouchDB
//! from the kit, single node), `cluster` (a 3-node kit cluster) or
//! `external` (`SPIEGEL_TEST_COUCHDB_URL`, which alone also selects it).
//! The binaries Spiegel ships do not depend on it. It also tells whether
//! `kubectl` and `docker` are installed, for the deployment tests, and
//! Chromium with its WebDriver, for the console's browser tests.

fn main() {
    println!("cargo::rerun-if-env-changed=SPIEGEL_TEST_SERVER");
    println!("cargo::rerun-if-env-changed=SPIEGEL_TEST_COUCHDB_URL");
    println!(
        "cargo::rustc-check-cfg=cfg(spiegel_test_server, values(\"test-server\", \"kit\", \"cluster\", \"external\"))"
    );
    let chosen = std::env::var("SPIEGEL_TEST_SERVER").unwrap_or_default();
    let external = std::env::var("SPIEGEL_TEST_COUCHDB_URL").is_ok_and(|u| !u.trim().is_empty());
    let server = match chosen.trim() {
        "" if external => "external",
        "" => "test-server",
        "test-server" | "kit" | "cluster" | "external" => chosen.trim(),
        other => {
            panic!("SPIEGEL_TEST_SERVER={other:?}: expected test-server, kit, cluster or external")
        }
    };
    println!("cargo::rustc-cfg=spiegel_test_server=\"{server}\"");
    // Tools some deployment tests run; without them those tests are
    // reported as ignored.
    println!("cargo::rerun-if-env-changed=PATH");
    for (tools, cfg) in [
        (&["kubectl"][..], "spiegel_has_kubectl"),
        (&["docker"][..], "spiegel_has_docker"),
        (&["chromium", "chromedriver"][..], "spiegel_has_chromium"),
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if tools.iter().all(|tool| on_path(tool)) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}
