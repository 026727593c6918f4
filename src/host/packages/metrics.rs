//! Sample-quality metrics and plots in scripts: alignment / Fréchet distance /
//! diversity (see `crate::metrics`), and PNG plots of a metrics log.
//!
//! ```text
//! print(alignment(fake.labels, toy_labels(captions)));
//! print(frechet_distance(fake.features, real.features));
//! print(diversity(fake.features, captions));
//! plot_jsonl("out/metrics.jsonl", "out/curves.png", #{ x: "iteration", panels: [["fake_loss"], ["alignment"]] });
//! ```

use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use crate::io::plot::{self, Panel, Points, Series};
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

/// `#{ name, points: [[x, y], ...], labels: [...], line: bool }` → `Points`.
fn points_from_map(m: &rhai::Dynamic) -> ScriptResult<Points> {
    let m = m
        .clone()
        .try_cast::<Map>()
        .ok_or_else(|| script_err("plot_points: each set is a map #{ name, points, labels, line }"))?;
    let name = m.get("name").map(|v| v.to_string()).unwrap_or_default();
    let raw = m
        .get("points")
        .and_then(|v| v.clone().try_cast::<Array>())
        .ok_or_else(|| script_err(format!("plot_points: set '{name}' needs points: [[x, y], ...]")))?;
    let mut points = vec![];
    for p in raw {
        let xy = p
            .try_cast::<Array>()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| script_err(format!("plot_points: set '{name}': a point is [x, y]")))?;
        // () (a metric a row lacks) becomes NaN: the point is left out.
        let coord = |v: &rhai::Dynamic| if v.is_unit() { Ok(f64::NAN) } else { number(v, "plot_points") };
        points.push((coord(&xy[0])?, coord(&xy[1])?));
    }
    let labels = match m.get("labels").and_then(|v| v.clone().try_cast::<Array>()) {
        Some(a) => a.iter().map(|v| v.to_string()).collect(),
        None => vec![],
    };
    let line = m.get("line").and_then(|v| v.as_bool().ok()).unwrap_or(false);
    Ok(Points { name, points, labels, line })
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
    api.func(
        "plot_points",
        ["png", "opts"],
        "Plots labelled points on one pair of axes as PNG (e.g. alignment against diversity, one point per table row). Options: title, x and y (axis labels), sets (array of #{ name, points: [[x, y], ...], labels: [...], line: joins the points in order }).",
        |png: &str, o: Map| -> ScriptResult<()> {
            let text = |k: &str| o.get(k).map(|v| v.to_string()).unwrap_or_default();
            let sets = o
                .get("sets")
                .and_then(|v| v.clone().try_cast::<Array>())
                .ok_or_else(|| script_err("plot_points: opts.sets must be an array of point sets"))?
                .iter()
                .map(points_from_map)
                .collect::<ScriptResult<Vec<_>>>()?;
            plot::write_scatter_png(Path::new(png), &text("title"), &text("x"), &text("y"), &sets).script()
        },
    );
}
