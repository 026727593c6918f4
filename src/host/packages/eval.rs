//! Standard evaluation in scripts: the FID Inception, DINOv2 and CLIP, feature
//! statistics under a named protocol, statistics files, the Fréchet distance and
//! CLIP score.
//!
//! ```text
//! let fid_net = load_fid_inception("weights/fid_inception.safetensors");
//! let acc = feature_stats("gigagan-coco256");
//! acc.add(fid_net.features(to_u8_images(x, "gigagan-coco256"), "gigagan-coco256"));
//! let fid = acc.frechet_distance(load_stats("stats/coco2014val_gigagan256.safetensors"));
//! let clip = load_clip("weights/clip-vit-g-14");
//! let cos = clip.cosines(to_u8_images(x, "gigagan-coco256"), captions, "gigagan-coco256");
//! ```

use crate::eval::clip::Clip;
use crate::eval::dinov2::Dinov2;
use crate::eval::inception::FidInception;
use crate::eval::protocol::Protocol;
use crate::eval::stats::{FeatureStats, StoredStats};
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use rhai::Map;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The FID Inception (`FidInception` in scripts).
#[derive(Clone)]
pub struct FidHandle(Arc<FidInception>);

/// DINOv2 (`Dinov2` in scripts).
#[derive(Clone)]
pub struct DinoHandle(Arc<Dinov2>);

/// A CLIP model with its tokenizer (`Clip` in scripts).
#[derive(Clone)]
pub struct ClipHandle(Arc<Clip>);

/// Feature sums under one protocol (`FeatureStats` in scripts); sized by the
/// first features added (2048 for the Inception, 1024 for DINOv2 ViT-L/14).
#[derive(Clone)]
pub struct StatsHandle(Arc<Mutex<(Protocol, Option<FeatureStats>)>>);

impl StatsHandle {
    fn stored(&self, extra: &Map) -> ScriptResult<StoredStats> {
        let guard = self.0.lock().map_err(|_| script_err("feature statistics: lock poisoned"))?;
        let (protocol, sums) = &*guard;
        let sums = sums.as_ref().ok_or_else(|| script_err("feature statistics: no features added"))?;
        let gaussian = sums.gaussian(protocol.ddof).script()?;
        let mut metadata: std::collections::HashMap<String, String> =
            extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        metadata.insert("protocol".into(), protocol.id());
        metadata.insert("n".into(), sums.count().to_string());
        metadata.insert("ddof".into(), protocol.ddof.to_string());
        metadata.entry("source".into()).or_insert_with(|| "computed".into());
        metadata.insert("created_by".into(), format!("sidscript {}", env!("CARGO_PKG_VERSION")));
        Ok(StoredStats { gaussian, metadata })
    }
}

fn protocol(name: &str) -> ScriptResult<Protocol> {
    Protocol::by_name(name).script()
}

/// Features of uint8 `images` under protocol `name`, through `network` (the
/// Inception when `inception`, else DINOv2; a protocol of the other is refused).
fn features(
    name: &str,
    inception: bool,
    images: &TensorHandle,
    device: &candle_core::Device,
    network: impl FnOnce(&candle_core::Tensor) -> crate::Result<candle_core::Tensor>,
) -> ScriptResult<TensorHandle> {
    let protocol = protocol(name)?;
    protocol.check_detector(inception).script()?;
    let input = protocol.detector_input(images.tensor(), device).script()?;
    Ok(TensorHandle::new(network(&input).script()?))
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<FidHandle>("FidInception");
    api.engine.register_type_with_name::<DinoHandle>("Dinov2");
    api.engine.register_type_with_name::<ClipHandle>("Clip");
    api.engine.register_type_with_name::<StatsHandle>("FeatureStats");
    api.engine.register_type_with_name::<StoredStats>("Stats");
    api.group("evaluation");
    let r = rt.clone();
    api.func(
        "load_fid_inception",
        ["path"],
        "The FID Inception (pytorch-fid names; convert pt_inception-2015-12-05 with tools/convert_eval_weights.py) on the run's device.",
        move |p: &str| -> ScriptResult<FidHandle> {
            Ok(FidHandle(Arc::new(FidInception::load(Path::new(p), &r.device).script()?)))
        },
    );
    api.method(
        "features",
        ["fid", "images", "protocol"],
        "pool3 features (N×2048) of N×3×H×W uint8 images, cropped, pre-resized and brought to 299 as the protocol says.",
        |f: &mut FidHandle, x: TensorHandle, p: &str| {
            features(p, true, &x, &f.0.device(), |input| f.0.features(input))
        },
    );
    let r = rt.clone();
    api.func(
        "load_dinov2",
        ["path"],
        "DINOv2 for FD-DINOv2 (the hub backbone; convert dinov2_vitl14_pretrain.pth with tools/convert_eval_weights.py dinov2) on the run's device.",
        move |p: &str| -> ScriptResult<DinoHandle> {
            Ok(DinoHandle(Arc::new(Dinov2::load(Path::new(p), &r.device).script()?)))
        },
    );
    api.method(
        "features",
        ["dinov2", "images", "protocol"],
        "CLS features (N×1024 for ViT-L/14) of N×3×H×W uint8 images, brought to 224 as the protocol says (dgm-eval-dinov2, edm2-dinov2).",
        |f: &mut DinoHandle, x: TensorHandle, p: &str| {
            features(p, false, &x, &f.0.device(), |input| f.0.features(input))
        },
    );
    let r = rt.clone();
    api.func(
        "load_clip",
        ["folder"],
        "A CLIP model for CLIP score on the run's device: a folder in transformers' layout (config.json, model.safetensors) or OpenCLIP's (open_clip_config.json, open_clip_model.safetensors), with its tokenizer files (tools/convert_eval_weights.py clip makes one from the published .bin).",
        move |p: &str| -> ScriptResult<ClipHandle> {
            Ok(ClipHandle(Arc::new(Clip::load(Path::new(p), &r.device).script()?)))
        },
    );
    api.method(
        "cosines",
        ["clip", "images", "captions", "protocol"],
        "The cosine of each of N×3×H×W uint8 images with its caption, preprocessed and prefixed as the protocol's CLIP score says; CLIP score is their mean (not ×100, not clamped).",
        |c: &mut ClipHandle, x: TensorHandle, captions: rhai::Array, p: &str| -> ScriptResult<rhai::Array> {
            let captions: Vec<String> = captions.into_iter().map(|v| v.to_string()).collect();
            let (images, rule) = protocol(p)?.clip_prepare(x.tensor()).script()?;
            Ok(c.0.cosines(&images, &captions, &rule).script()?.into_iter().map(rhai::Dynamic::from_float).collect())
        },
    );
    api.getter("describe", "The CLIP architecture in one line (for result rows).", |c: &mut ClipHandle| {
        c.0.describe().to_string()
    });
    api.func(
        "detector_sha256",
        ["path"],
        "The SHA-256 of the published file a converted detector came from (its metadata's source_sha256), to record beside statistics.",
        |p: &str| -> ScriptResult<String> {
            let meta = crate::io::safetensors::metadata(Path::new(p)).script()?;
            meta.get("source_sha256").cloned().ok_or_else(|| {
                script_err(format!("{p}: no source_sha256 in its metadata (convert it with tools/convert_eval_weights.py)"))
            })
        },
    );
    api.func(
        "protocol_has_clip",
        ["protocol"],
        "Whether a protocol defines a CLIP score (gigagan-coco256, sid-inloop, dmd2-coco10k-512 and dmd2-coco10k-patch do).",
        |p: &str| -> ScriptResult<bool> { Ok(protocol(p)?.clip.is_some()) },
    );
    api.func(
        "to_u8_images",
        ["images", "protocol"],
        "A generator's [-1, 1] images as uint8 by the protocol's rule (round: floor(127.5x + 128); dmd2: trunc(127.5(x + 1))).",
        |x: TensorHandle, p: &str| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(protocol(p)?.to_u8(x.tensor()).script()?))
        },
    );
    api.func(
        "prepare_images",
        ["images", "protocol"],
        "N×3×H×W uint8 images cropped and pre-resized as the protocol says (Pillow-exact), e.g. to batch reference images of different sizes.",
        |x: TensorHandle, p: &str| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(protocol(p)?.prepare(x.tensor()).script()?))
        },
    );
    api.func(
        "protocol_detector",
        ["protocol"],
        "The network a protocol's features come from: \"inception\" (load_fid_inception) or \"dinov2\" (load_dinov2).",
        |p: &str| -> ScriptResult<String> {
            Ok(if protocol(p)?.check_detector(true).is_ok() { "inception" } else { "dinov2" }.to_string())
        },
    );
    api.func(
        "protocol_id",
        ["protocol"],
        "A protocol's versioned id (\"gigagan-coco256/1\"), as statistics files and result rows carry it; an unknown name is an error listing the known ones.",
        |p: &str| -> ScriptResult<String> { Ok(protocol(p)?.id()) },
    );
    api.func(
        "feature_stats",
        ["protocol"],
        "Empty feature sums under a protocol (gigagan-coco256, sid-inloop, dmd2-coco10k-512, dmd2-coco10k-patch, pytorch-fid, dgm-eval-dinov2, edm2-dinov2).",
        |p: &str| -> ScriptResult<StatsHandle> { Ok(StatsHandle(Arc::new(Mutex::new((protocol(p)?, None))))) },
    );
    api.method("add", ["stats", "features"], "Adds N×D features.", |s: &mut StatsHandle, x: TensorHandle| {
        let mut guard = s.0.lock().map_err(|_| script_err("feature statistics: lock poisoned"))?;
        if guard.1.is_none() {
            let width = x.tensor().dims().get(1).copied().unwrap_or(0);
            guard.1 = Some(FeatureStats::new(width).script()?);
        }
        guard.1.as_mut().map_or(Ok(()), |sums| sums.add(x.tensor())).script()
    });
    api.getter("count", "Features added.", |s: &mut StatsHandle| {
        s.0.lock().ok().and_then(|g| g.1.as_ref().map(|f| f.count() as i64)).unwrap_or(0)
    });
    api.method(
        "save",
        ["stats", "path", "info"],
        "Writes the statistics (μ, Σ with the protocol's denominator) with their protocol, n and ddof, plus the info map (dataset, detector, ...).",
        |s: &mut StatsHandle, p: &str, info: Map| s.stored(&info)?.save(Path::new(p)).script(),
    );
    api.method(
        "frechet_distance",
        ["stats", "reference"],
        "The Fréchet distance (FID) to reference statistics of the same protocol.",
        |s: &mut StatsHandle, r: StoredStats| -> ScriptResult<f64> {
            s.stored(&Map::new())?.frechet_distance(&r).script()
        },
    );
    api.func(
        "load_stats",
        ["path"],
        "Reference statistics written by sidscript (they carry their protocol).",
        |p: &str| StoredStats::load(Path::new(p)).script(),
    );
    api.func(
        "import_npz_stats",
        ["path", "protocol"],
        "clean-fid / pytorch-fid .npz statistics (mu, sigma), which carry no protocol: name the one they were computed under.",
        |p: &str, proto: &str| -> ScriptResult<StoredStats> {
            StoredStats::import_npz(Path::new(p), &protocol(proto)?.id()).script()
        },
    );
    api.getter("protocol", "The protocol the statistics were computed under.", |s: &mut StoredStats| {
        s.protocol().to_string()
    });
    api.getter(
        "info",
        "The statistics file's metadata (protocol, n, ddof, dataset, detector, ...).",
        |s: &mut StoredStats| s.metadata.iter().map(|(k, v)| (k.as_str().into(), v.clone().into())).collect::<Map>(),
    );
    api.method("save", ["stats", "path"], "Writes the statistics to a file.", |s: &mut StoredStats, p: &str| {
        s.save(Path::new(p)).script()
    });
}
