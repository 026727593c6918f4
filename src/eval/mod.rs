//! Standard evaluation (FID, CLIP score, FD-DINOv2) as the published tables compute
//! it: each protocol is a named set of choices (uint8 rounding, crops, resizes,
//! normalisation, covariance), and the pieces here reproduce the libraries those
//! tables came from. See ../shared/notes/EVALUATION.md for the protocols.
//!
//! - [`clip`]: CLIP score (both towers, either checkpoint layout, each protocol's image path and prefix).
//! - [`dinov2`]: the DINOv2 ViT for FD-DINOv2 (CLS after the final norm) and dgm-eval's input.
//! - [`inception`]: the FID Inception (pool3 features) and its front ends.
//! - [`protocol`]: the named protocols (uint8 rule, crop, pre-resize, front end, ddof).
//! - [`resample`]: Pillow-, TensorFlow-1- and torch-exact image resizes.
//! - [`stats`]: feature statistics, statistics files stamped with their protocol,
//!   `.npz` import, the Fréchet distance.

pub mod clip;
pub mod dinov2;
pub mod inception;
pub mod protocol;
pub mod resample;
pub mod stats;
