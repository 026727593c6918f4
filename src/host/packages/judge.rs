//! The `Judge` type in scripts: the toy world's attribute classifier.
//!
//! ```text
//! let judge = load_judge("models/toy/judge");
//! let fake = judge.predict(images);             // #{ labels, features, ... }
//! ```

use super::model::{register_model, ModelDocs};
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::toy::judge::Judge;
use crate::train::Model;
use rhai::{Dynamic, Map};
use std::sync::Arc;

/// The toy world's attribute classifier as scripts see it (`Judge`).
pub type JudgeHandle = Model<Judge>;

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<JudgeHandle>("Judge");
    api.group("metrics: judge");
    api.method(
        "loss",
        ["judge", "images", "labels"],
        "Sum over the four attributes of the mean cross-entropy against n×4 labels (as toy_batch gives).",
        |j: &mut JudgeHandle, x: TensorHandle, l: TensorHandle| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(j.net.loss(x.tensor(), l.tensor()).script()?))
        },
    );
    api.method(
        "predict",
        ["judge", "images"],
        "What the judge sees in images in [-1, 1]: #{ labels (n×4: size, colour, shape, position), features (n×64), logits }.",
        |j: &mut JudgeHandle, x: TensorHandle| -> ScriptResult<Map> {
            let out = j.net.forward(x.tensor()).script()?;
            let mut m = Map::new();
            m.insert("labels".into(), Dynamic::from(TensorHandle::new(out.labels().script()?)));
            m.insert("features".into(), Dynamic::from(TensorHandle::new(out.features)));
            m.insert("logits".into(), Dynamic::from(TensorHandle::new(out.logits)));
            Ok(m)
        },
    );
    register_model::<Judge>(
        api,
        rt,
        ModelDocs {
            name: "judge",
            config: ". Config: channels ([32, 64, 64]), features (64), image_size (32)",
            what: "judge",
            arg: "judge",
            trainable_copy: false,
        },
    );
}
