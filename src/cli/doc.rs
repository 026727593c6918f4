//! `sidscript doc [--json]`.

use crate::host::{docs, Host, HostOptions};

pub fn print(json: bool) -> anyhow::Result<()> {
    let host = Host::new(HostOptions::default())?;
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&serde_json::json!({ "functions": host.docs() }))?)
    } else {
        format!("{}\n{} functions.\n", docs::render_text(host.docs()), host.docs().len())
    };
    // A reader that stops early (`sidscript doc | head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
