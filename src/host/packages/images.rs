//! Image grids in scripts: decoded images written as PNG grids.
//!
//! ```text
//! save_image_grid(vae.decode(z), "out/grid.png");
//! ```

use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use std::path::Path;

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("images");
    api.func(
        "save_image_grid",
        ["images", "path"],
        "Writes B×3×H×W images in [-1, 1] as a PNG grid (about square), atomically.",
        |x: TensorHandle, p: &str| -> ScriptResult<()> {
            let b = x.tensor().dim(0).script()?;
            let cols = (b as f64).sqrt().ceil() as usize;
            crate::io::image::save_grid(Path::new(p), x.tensor(), cols).script()
        },
    );
    api.func(
        "save_image_grid",
        ["images", "path", "cols"],
        "Writes images as a PNG grid with `cols` columns, atomically.",
        |x: TensorHandle, p: &str, cols: i64| -> ScriptResult<()> {
            crate::io::image::save_grid(Path::new(p), x.tensor(), crate::host::args::count(cols, "cols")?).script()
        },
    );
}
