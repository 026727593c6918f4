//! Sample-quality metrics and plots in scripts: alignment / Fréchet distance /
//! diversity (see `crate::metrics`), and PNG plots of a metrics log.
//!
//! ```text
//! print(alignment(fake.labels, toy_labels(captions)));
//! print(frechet_distance(fake.features, real.features));
//! print(diversity(fake.features, captions));
//! plot_jsonl("out/metrics.jsonl", "out/curves.png", #{ x: "iteration", panels: [["fake_loss"], ["alignment"]] });
//! ```

use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use crate::io::plot::{self, Panel, Series};
use rhai::{Array, Map};
use std::path::Path;

fn strings(a: &Array, what: &str) -> ScriptResult<Vec<String>> {
    a.iter()
        .map(|v| v.clone().into_string().map_err(|t| script_err(format!("{what}: expected strings, got {t}"))))
        .collect()
}

fn panels_from_jsonl(path: &str, x: &str, panels: &Array) -> ScriptResult<Vec<Panel>> {
    let text = std::fs::read_to_string(path).map_err(|e| script_err(format!("{path}: {e}")))?;
    let records: Vec<serde_json::Value> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| script_err(format!("{path}:{}: {e}", i + 1))))
        .collect::<ScriptResult<_>>()?;
    let mut out = vec![];
    for p in panels {
        let keys: Vec<String> = match p.clone().try_cast::<Array>() {
            Some(a) => strings(&a, "plot_jsonl panel")?,
            None => vec![p
                .clone()
                .into_string()
                .map_err(|t| script_err(format!("plot_jsonl: a panel is a key or an array of keys, got {t}")))?],
        };
        let series = keys
            .iter()
            .map(|k| Series {
                name: k.clone(),
                points: records.iter().filter_map(|r| Some((r.get(x)?.as_f64()?, r.get(k)?.as_f64()?))).collect(),
            })
            .collect();
        out.push(Panel { title: keys.join(", "), series });
    }
    Ok(out)
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("metrics");
    api.func(
        "alignment",
        ["predicted", "target"],
        "Share of rows of two n×A label tensors that agree in every column (all attributes right).",
        |p: TensorHandle, t: TensorHandle| -> ScriptResult<f64> {
            crate::metrics::alignment(p.tensor(), t.tensor()).script()
        },
    );
    api.func(
        "frechet_distance",
        ["features_a", "features_b"],
        "Fréchet distance between Gaussians fitted to two N×D feature sets (FID's formula).",
        |a: TensorHandle, b: TensorHandle| -> ScriptResult<f64> {
            crate::metrics::frechet_distance(a.tensor(), b.tensor()).script()
        },
    );
    api.func(
        "diversity",
        ["features", "prompts"],
        "Mean pairwise distance between feature rows that share a prompt, averaged over prompts.",
        |f: TensorHandle, g: Array| -> ScriptResult<f64> {
            crate::metrics::diversity(f.tensor(), &strings(&g, "diversity")?).script()
        },
    );

    api.group("metrics: plots");
    api.func(
        "plot_jsonl",
        ["jsonl", "png", "opts"],
        "Plots a JSONL metrics log as PNG line charts. Options: x (the x key, \"iteration\"), panels (array; each a key or an array of keys drawn together), columns (2).",
        |src: &str, png: &str, o: Map| -> ScriptResult<()> {
            let x = o.get("x").map(|v| v.to_string()).unwrap_or_else(|| "iteration".into());
            let panels = o
                .get("panels")
                .and_then(|v| v.clone().try_cast::<Array>())
                .ok_or_else(|| script_err("plot_jsonl: opts.panels must be an array of keys"))?;
            let columns = o.get("columns").and_then(|v| v.as_int().ok()).unwrap_or(2).max(1) as usize;
            plot::write_png(Path::new(png), &x, &panels_from_jsonl(src, &x, &panels)?, columns).script()
        },
    );
}
