//! The documentation describes the options the binary really has.

use clap::CommandFactory;
use spiegel::config::Cli;

#[test]
fn configuration_reference_lists_every_option_with_its_variable_and_default() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let command = Cli::command();
    let mut checked = 0;
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("`--{long}`");
        let row = doc
            .lines()
            .find(|line| line.starts_with(&format!("| {flag} ")))
            .unwrap_or_else(|| panic!("docs/configuration.md has no table row for {flag}"));
        if let Some(env) = arg.get_env() {
            let env = format!("`{}`", env.to_string_lossy());
            assert!(
                row.contains(&env),
                "the row of {flag} does not name {env}: {row}"
            );
        }
        for default in arg.get_default_values() {
            let default = default.to_string_lossy();
            let shown = if default.is_empty() {
                "`\"\"`".to_string()
            } else {
                format!("`{default}`")
            };
            assert!(
                row.contains(&shown),
                "the row of {flag} does not give the default {shown}: {row}"
            );
        }
        checked += 1;
    }
    for sub in command.get_subcommands() {
        let name = format!("| `{}` |", sub.get_name());
        assert!(
            doc.contains(&name),
            "docs/configuration.md does not describe the {name} command"
        );
    }
    assert!(checked > 20, "only {checked} options checked");
}
