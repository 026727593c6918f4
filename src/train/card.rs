//! The generator card: the README.md of an exported generator, with the model-card
//! front matter the Hugging Face hub reads, what the generator is and how it was
//! made, its evaluation rows, and a diffusers snippet that samples it; and the
//! `pipeline.py` (diffusers' `custom_pipeline` mechanism) that runs SiD's few-step
//! chain, since no stock scheduler starts from σ_{t_init}·z at t_init.
//!
//! ```
//! use sidscript::train::card::GeneratorCard;
//! let card = GeneratorCard { teacher: "models/sd15".into(), steps: 4, t_init: 625, ..Default::default() };
//! let md = card.markdown("out/generator");
//! assert!(md.starts_with("---\nlibrary_name: diffusers"));
//! assert!(card.pipeline_py().contains("T_INIT = 625"));
//! ```

/// What the card says about one generator.
#[derive(Clone, Debug, Default)]
pub struct GeneratorCard {
    /// The teacher's folder.
    pub teacher: String,
    /// The teacher's hub id when known (front matter `base_model`).
    pub base_model: Option<String>,
    /// The guidance strategy's name (`lsg(1.5)`).
    pub guidance: Option<String>,
    /// Its scales κ1 (fake net in its loss), κ2 (fake net in the generator loss), κ4 (teacher).
    pub kappas: Option<[f64; 3]>,
    /// K, the steps the generator was trained for.
    pub steps: usize,
    /// The chain's first timestep.
    pub t_init: usize,
    /// The training chain's re-noising (fresh, fixed, ddim).
    pub renoise: String,
    /// Iterations run.
    pub iterations: Option<i64>,
    /// Generator images seen.
    pub images: Option<i64>,
    /// The EMA's half-life in images when the exported weights are the EMA's; None for raw weights.
    pub ema_half_life: Option<f64>,
    /// The run's seed.
    pub seed: Option<i64>,
    /// The command line that made it.
    pub command: String,
    /// Evaluation rows: (column, value) pairs, one list per row.
    pub rows: Vec<Vec<(String, String)>>,
}

impl GeneratorCard {
    /// The training chain's re-noising, `fresh` when not recorded.
    fn renoise(&self) -> &str {
        if self.renoise.is_empty() {
            "fresh"
        } else {
            &self.renoise
        }
    }

    /// The README.md for the export at `folder`.
    pub fn markdown(&self, folder: &str) -> String {
        let mut front = String::from("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n");
        if let Some(b) = &self.base_model {
            front.push_str(&format!("base_model: {b}\n"));
        }
        front.push_str("tags:\n- text-to-image\n- score-identity-distillation\n- few-step\n- sidscript\n---\n\n");
        let renoise = self.renoise();
        let guidance = match (&self.guidance, self.kappas) {
            (Some(g), Some([k1, k2, k4])) => {
                format!("{g} (κ: fake net in its loss {k1}, fake net in the generator loss {k2}, teacher {k4})")
            }
            (Some(g), None) => g.clone(),
            _ => "not recorded".into(),
        };
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "not recorded".into());
        let weights = match self.ema_half_life {
            Some(h) => format!("EMA of the generator (half-life {h} images)"),
            None => "the generator's own (no EMA)".into(),
        };
        let mut table = vec![
            ("teacher", format!("`{}`", self.teacher)),
            ("guidance in training", guidance),
            ("steps trained for (K)", self.steps.to_string()),
            ("t_init", self.t_init.to_string()),
            ("training chain's re-noising", renoise.to_string()),
            ("iterations", or_unknown(self.iterations.map(|i| i.to_string()))),
            ("generator images seen", or_unknown(self.images.map(|i| i.to_string()))),
            ("weights", weights),
            ("seed", or_unknown(self.seed.map(|s| s.to_string()))),
            ("made by", format!("sidscript {}", env!("CARGO_PKG_VERSION"))),
        ];
        if !self.command.is_empty() {
            table.push(("command", format!("`{}`", self.command)));
        }
        let mut md = front;
        md.push_str(&format!(
            "# A {}-step SiD generator distilled from `{}`\n\n\
             One UNet that samples in 1 to {} network evaluations, distilled from the teacher with Score \
             identity Distillation in its few-step form (one generator for every step count, trained on the \
             uniform mixture of its step outputs) by sidscript. The folder is the \
             teacher's diffusers pipeline with this UNet in `unet/`; `pipeline.py` samples it.\n\n\
             | | |\n|---|---|\n",
            self.steps, self.teacher, self.steps
        ));
        for (k, v) in table {
            md.push_str(&format!("| {k} | {} |\n", v.replace('|', "\\|")));
        }
        md.push_str(&format!(
            "\n## Sampling\n\n\
             The chain starts from σ(t_init)·z at t_0 = {t} (not from unit noise at t = 999: the stock \
             pipelines with this folder's scheduler draw nothing in 1 step), predicts x̂ = f(x, t_i, c) \
             without classifier-free guidance, and re-noises x̂ to t_(i+1) = ⌊{t}·(1 − (i+1)/n)⌋ for n \
             steps; `pipeline.py` does this with diffusers' `custom_pipeline` mechanism, with the \
             re-noising `fresh` (new noise, as in training), `ddim` (the noise the previous step implies) \
             or `fixed`.\n\n\
             ```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n\
             pipe = DiffusionPipeline.from_pretrained(\"{f}\", custom_pipeline=\"{f}\", trust_remote_code=True)\n\
             for steps in (1, 2, 4):\n    \
             image = pipe(\"a photo of a cat\", num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images[0]\n    \
             image.save(f\"sample-{{steps}}.png\")\n```\n\n\
             `renoise=\"ddim\"` picks the deterministic chain; `latents=z` (unit noise) and `noises=[...]` (the \
             n − 1 fresh-noise tensors) reproduce a given draw; `output_type=\"latent\"` returns x̂.\n",
            t = self.t_init,
            f = folder
        ));
        if !self.rows.is_empty() {
            let mut cols: Vec<&str> = vec![];
            for row in &self.rows {
                for (k, _) in row {
                    if !cols.contains(&k.as_str()) {
                        cols.push(k);
                    }
                }
            }
            // What was sampled first, then the measures in the order met.
            let rank = |k: &str| ["model", "steps", "renoise", "guidance"].iter().position(|c| *c == k).unwrap_or(4);
            cols.sort_by_key(|k| rank(k));
            md.push_str("\n## Evaluation\n\nAs the run measured it:\n\n");
            md.push_str(&format!("| {} |\n|{}\n", cols.join(" | "), "---|".repeat(cols.len())));
            for row in &self.rows {
                let cells: Vec<String> = cols
                    .iter()
                    .map(|c| row.iter().find(|(k, _)| k == c).map(|(_, v)| v.clone()).unwrap_or_else(|| "–".into()))
                    .collect();
                md.push_str(&format!("| {} |\n", cells.join(" | ")));
            }
        }
        md
    }

    /// The sampler file, with this generator's t_init, K and re-noising as its defaults.
    pub fn pipeline_py(&self) -> String {
        let renoise = self.renoise();
        include_str!("../../assets/export/pipeline.py")
            .replace("{t_init}", &self.t_init.to_string())
            .replace("{steps}", &self.steps.to_string())
            .replace("{renoise}", renoise)
    }
}
