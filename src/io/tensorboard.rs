//! TensorBoard event files, as `tensorboard --logdir` reads them: the documented
//! TFRecord framing (length, masked CRC-32C of the length, an `Event` protocol buffer,
//! masked CRC-32C of it) around `Event { wall_time, step, summary | file_version }`,
//! with scalar and PNG-image summary values. The messages are the fields of
//! tensorflow/core/util/event.proto and summary.proto that these need, declared with
//! prost; the checksum is the crc32c crate's. Every record is flushed as written, so
//! a running job shows up live.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    image: Option<Image>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An open event file in a log folder.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
    clock: fn() -> f64,
}

impl EventWriter {
    /// Starts a new event file in `dir` (created if missing):
    /// `events.out.tfevents.<seconds>.<host>.<pid>.sidscript`, opened with the
    /// file-version record TensorBoard expects first.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        let name = format!("events.out.tfevents.{}.{host}.{}.sidscript", now() as u64, std::process::id());
        Self::create_file(&dir.join(name), now)
    }

    /// An event file at `path` whose records carry the wall time `clock` gives (the
    /// system clock in [`EventWriter::create`]; a fixed one to compare files byte for byte).
    pub fn create_file(path: &Path, clock: fn() -> f64) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = Self { path: path.to_path_buf(), file, clock };
        w.write(&Event { wall_time: clock(), step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        use prost::Message;
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&rec).and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }

    fn summary(&mut self, step: i64, value: Vec<Value>) -> Result<()> {
        self.write(&Event { wall_time: (self.clock)(), step, file_version: None, summary: Some(Summary { value }) })
    }

    /// Scalars at `step`, one record: (tag, value) pairs.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let value =
            values.iter().map(|(tag, v)| Value { tag: tag.clone(), simple_value: Some(*v), image: None }).collect();
        self.summary(step, value)
    }

    /// A PNG image at `step` (its size is read from the PNG header).
    pub fn png(&mut self, tag: &str, step: i64, png: &[u8]) -> Result<()> {
        let img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .map_err(|e| Error::file(&self.path, Some(tag), format!("not a PNG image: {e}")))?;
        let colorspace = img.color().channel_count() as i32;
        let image = Image {
            height: img.height() as i32,
            width: img.width() as i32,
            colorspace,
            encoded_image_string: png.to_vec(),
        };
        self.summary(step, vec![Value { tag: tag.to_string(), simple_value: None, image: Some(image) }])
    }
}
