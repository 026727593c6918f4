//! `sidscript doc [--json]`.

use crate::host::{docs, Host, HostOptions};

pub fn print(json: bool) -> anyhow::Result<()> {
    let host = Host::new(HostOptions::default())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "functions": host.docs() }))?);
    } else {
        print!("{}", docs::render_text(host.docs()));
        println!("\n{} functions.", host.docs().len());
    }
    Ok(())
}
