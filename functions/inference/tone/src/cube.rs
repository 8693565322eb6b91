//! `.cube` 3D LUTs (the Adobe / IRIDAS format Resolve reads and writes), parsed strictly and
//! sampled by tetrahedral interpolation.
//!
//! The format (Adobe "Cube LUT Specification" 1.0), one statement per line:
//!
//! - blank lines and lines starting with `#` are ignored;
//! - keywords first, each at most once: `TITLE "text"`, `LUT_3D_SIZE N` (required),
//!   `DOMAIN_MIN r g b` and `DOMAIN_MAX r g b` (default 0 0 0 and 1 1 1), or Resolve's
//!   `LUT_3D_INPUT_RANGE min max` (the same domain on all three channels);
//! - then N³ lines of three numbers, the output for each grid point, **red changing fastest**,
//!   then green, then blue.
//!
//! A LUT file is untrusted input. Anything else is an error naming its line: unknown keywords
//! (case matters), 1D LUTs, keywords after the table, a size outside 2 to
//! [`CubeLimits::max_size`], NaN or infinite numbers, an empty domain, and a table that is
//! one line short or long. The file may be at most [`CubeLimits::max_bytes`] long, which is
//! checked before it is read. A UTF-8 byte-order mark is allowed; `\r\n` line ends too.
//!
//! Inputs are mapped from the domain to the grid and clamped to it; outputs are returned as
//! the table has them (the grade clamps to [0, 1] when it encodes). Tetrahedral interpolation
//! splits each grid cell into six tetrahedra along its grey diagonal, so it reproduces any
//! affine map (identity, channel swaps, inversion) exactly and keeps greys on the diagonal
//! of a neutral LUT, with four table reads instead of trilinear's eight.

use std::io::Read;
use std::path::Path;

use crate::{Result, ToneError};

/// Limits on a `.cube` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CubeLimits {
    /// Largest `LUT_3D_SIZE` (default 129: 2.1 M entries, 26 MB; common sizes are 17, 33
    /// and 65).
    pub max_size: usize,
    /// Largest file, in bytes (default 64 MiB: a 129³ table at 30 bytes a line).
    pub max_bytes: u64,
}

impl Default for CubeLimits {
    fn default() -> Self {
        CubeLimits {
            max_size: 129,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A parsed 3D LUT.
#[derive(Debug, Clone, PartialEq)]
pub struct CubeLut {
    title: Option<String>,
    size: usize,
    domain_min: [f32; 3],
    domain_max: [f32; 3],
    /// Grid steps per unit of input, per channel: `(size − 1) / (max − min)`.
    scale: [f32; 3],
    /// `size³` outputs, red fastest.
    table: Vec<[f32; 3]>,
}

const CHANNELS: [&str; 3] = ["red", "green", "blue"];

/// Characters of a bad token quoted in an error.
const EXCERPT_CHARS: usize = 40;

fn excerpt(token: &str) -> String {
    token.chars().take(EXCERPT_CHARS).collect()
}

fn syntax(line: usize, message: impl Into<String>) -> ToneError {
    ToneError::LutSyntax {
        line,
        message: message.into(),
    }
}

/// A finite number, or an error naming `line`.
fn number(line: usize, token: &str) -> Result<f32> {
    let value: f32 = token.parse().map_err(|_| ToneError::LutNotANumber {
        line,
        token: excerpt(token),
    })?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(ToneError::LutNotFinite {
            line,
            token: excerpt(token),
        })
    }
}

/// Exactly `N` finite numbers after `keyword`.
fn numbers<const N: usize>(line: usize, keyword: &str, arguments: &[&str]) -> Result<[f32; N]> {
    if arguments.len() != N {
        return Err(syntax(
            line,
            format!("{keyword} takes {N} numbers, found {}", arguments.len()),
        ));
    }
    let mut values = [0.0; N];
    for (value, token) in values.iter_mut().zip(arguments) {
        *value = number(line, token)?;
    }
    Ok(values)
}

/// Records the line of a keyword, refusing a second one.
fn once(seen: &mut Option<usize>, line: usize, keyword: &str) -> Result<()> {
    match seen {
        Some(first) => Err(syntax(
            line,
            format!("{keyword} given twice (first on line {first})"),
        )),
        None => {
            *seen = Some(line);
            Ok(())
        }
    }
}

impl CubeLut {
    /// Reads `name` from the LUT directory `dir`. `name` must be a plain file name (no path
    /// separator, not starting with `.`), as presets require.
    pub fn load(dir: &Path, name: &str, limits: &CubeLimits) -> Result<CubeLut> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0'])
            && Path::new(name).file_name() == Some(name.as_ref());
        if !plain {
            return Err(ToneError::LutName {
                name: name.to_owned(),
            });
        }
        CubeLut::from_file(&dir.join(name), limits)
    }

    /// Reads and parses a `.cube` file, refusing one over `limits.max_bytes` before reading.
    pub fn from_file(path: &Path, limits: &CubeLimits) -> Result<CubeLut> {
        let io_error = |source| ToneError::LutIo {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        let length = file.metadata().map_err(io_error)?.len();
        if length > limits.max_bytes {
            return Err(ToneError::LutTooLarge {
                limit: limits.max_bytes,
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
        // The file may grow between the check and the read: read one byte past the limit.
        file.take(limits.max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        CubeLut::from_bytes(&bytes, limits)
    }

    /// Parses the bytes of a `.cube` file.
    pub fn from_bytes(bytes: &[u8], limits: &CubeLimits) -> Result<CubeLut> {
        if bytes.len() as u64 > limits.max_bytes {
            return Err(ToneError::LutTooLarge {
                limit: limits.max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|error| ToneError::LutNotUtf8 {
            line: 1 + bytes[..error.valid_up_to()]
                .iter()
                .filter(|&&byte| byte == b'\n')
                .count(),
        })?;
        CubeLut::parse(text, limits)
    }

    /// Parses the text of a `.cube` file.
    pub fn parse(text: &str, limits: &CubeLimits) -> Result<CubeLut> {
        if text.len() as u64 > limits.max_bytes {
            return Err(ToneError::LutTooLarge {
                limit: limits.max_bytes,
            });
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut title = None;
        let mut title_line = None;
        let mut size: Option<usize> = None;
        let mut size_line = None;
        let mut domain_min = [0.0f32; 3];
        let mut domain_min_line = None;
        let mut domain_max = [1.0f32; 3];
        let mut domain_max_line = None;
        let mut input_range_line = None;
        let mut table: Vec<[f32; 3]> = Vec::new();
        let mut last_line = 0;

        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            last_line = line;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let tokens: Vec<&str> = content.split_ascii_whitespace().collect();
            let Some(&first) = tokens.first() else {
                continue;
            };
            // A line is table data when its first token reads as a number ("nan" and "inf"
            // included, so they are reported as not finite rather than as keywords).
            if first.parse::<f32>().is_ok() {
                let Some(size) = size else {
                    return Err(syntax(line, "table data before LUT_3D_SIZE"));
                };
                let expected = size * size * size;
                if table.len() == expected {
                    return Err(ToneError::LutEntryCount {
                        line,
                        expected,
                        found: expected + 1,
                    });
                }
                if tokens.len() != 3 {
                    return Err(syntax(
                        line,
                        format!("a table line has 3 numbers, found {}", tokens.len()),
                    ));
                }
                table.push([
                    number(line, tokens[0])?,
                    number(line, tokens[1])?,
                    number(line, tokens[2])?,
                ]);
                continue;
            }
            if !table.is_empty() {
                return Err(syntax(
                    line,
                    format!("keyword {:?} after the table data", excerpt(first)),
                ));
            }
            let arguments = &tokens[1..];
            match first {
                "TITLE" => {
                    once(&mut title_line, line, first)?;
                    let rest = content["TITLE".len()..].trim();
                    let quoted = rest.len() >= 2 && rest.starts_with('"') && rest.ends_with('"');
                    if !quoted {
                        return Err(syntax(line, "TITLE takes a text in double quotes"));
                    }
                    title = Some(rest[1..rest.len() - 1].to_owned());
                }
                "LUT_3D_SIZE" => {
                    once(&mut size_line, line, first)?;
                    let [token] = arguments else {
                        return Err(syntax(
                            line,
                            format!("LUT_3D_SIZE takes 1 integer, found {}", arguments.len()),
                        ));
                    };
                    let value: u64 = token.parse().map_err(|_| ToneError::LutNotANumber {
                        line,
                        token: excerpt(token),
                    })?;
                    let fits = (2..=limits.max_size as u64).contains(&value);
                    if !fits {
                        return Err(ToneError::LutSize {
                            line,
                            size: value,
                            max: limits.max_size,
                        });
                    }
                    let value = value as usize;
                    table.reserve_exact(value * value * value);
                    size = Some(value);
                }
                "DOMAIN_MIN" => {
                    once(&mut domain_min_line, line, first)?;
                    domain_min = numbers::<3>(line, first, arguments)?;
                }
                "DOMAIN_MAX" => {
                    once(&mut domain_max_line, line, first)?;
                    domain_max = numbers::<3>(line, first, arguments)?;
                }
                "LUT_3D_INPUT_RANGE" => {
                    once(&mut input_range_line, line, first)?;
                    let [low, high] = numbers::<2>(line, first, arguments)?;
                    domain_min = [low; 3];
                    domain_max = [high; 3];
                }
                "LUT_1D_SIZE" | "LUT_1D_INPUT_RANGE" => {
                    return Err(ToneError::LutOneDimensional { line });
                }
                _ => {
                    return Err(ToneError::LutUnknownKeyword {
                        line,
                        keyword: excerpt(first),
                    });
                }
            }
        }

        let Some(size) = size else {
            return Err(ToneError::LutMissingSize);
        };
        let expected = size * size * size;
        if table.len() != expected {
            return Err(ToneError::LutEntryCount {
                line: last_line,
                expected,
                found: table.len(),
            });
        }
        if let Some(line) = input_range_line
            && (domain_min_line.is_some() || domain_max_line.is_some())
        {
            return Err(syntax(
                line,
                "LUT_3D_INPUT_RANGE together with DOMAIN_MIN/DOMAIN_MAX",
            ));
        }
        let domain_line = [domain_min_line, domain_max_line, input_range_line]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        let mut scale = [0.0; 3];
        for channel in 0..3 {
            let (min, max) = (domain_min[channel], domain_max[channel]);
            // `max − min` must also be finite (e.g. not -3e38 to 3e38).
            let span = max - min;
            if !(span > 0.0 && span.is_finite()) {
                return Err(ToneError::LutEmptyDomain {
                    line: domain_line,
                    channel: CHANNELS[channel],
                    min,
                    max,
                });
            }
            scale[channel] = (size - 1) as f32 / span;
        }
        Ok(CubeLut {
            title,
            size,
            domain_min,
            domain_max,
            scale,
            table,
        })
    }

    /// The `TITLE`, if the file had one.
    pub fn title(&self) -> Option<&str> {
        self.title.as_deref()
    }

    /// `LUT_3D_SIZE`: grid points per axis.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The input domain: (`DOMAIN_MIN`, `DOMAIN_MAX`).
    pub fn domain(&self) -> ([f32; 3], [f32; 3]) {
        (self.domain_min, self.domain_max)
    }

    /// The output at grid point (`red`, `green`, `blue`), each index below [`CubeLut::size`].
    pub fn entry(&self, red: usize, green: usize, blue: usize) -> Option<[f32; 3]> {
        if red.max(green).max(blue) >= self.size {
            return None;
        }
        self.table
            .get(red + self.size * (green + self.size * blue))
            .copied()
    }

    /// The LUT at `rgb` (values in its domain; outside it they are clamped to its edge),
    /// interpolated tetrahedrally.
    #[inline]
    pub fn sample(&self, rgb: [f32; 3]) -> [f32; 3] {
        let last_cell = self.size as i32 - 2;
        let mut cell = [0usize; 3];
        let mut fraction = [0.0f32; 3];
        for channel in 0..3 {
            let position = ((rgb[channel] - self.domain_min[channel]) * self.scale[channel])
                .max(0.0)
                .min((self.size - 1) as f32);
            // Through `i32`: its conversions from and to `f32` are one instruction each.
            let index = (position as i32).min(last_cell);
            cell[channel] = index as usize;
            fraction[channel] = position - index as f32;
        }
        let (green_stride, blue_stride) = (self.size, self.size * self.size);
        let base = cell[0] + green_stride * cell[1] + blue_stride * cell[2];
        let at = |offset: usize| self.table.get(base + offset).copied().unwrap_or([0.0; 3]);
        let [fr, fg, fb] = fraction;
        let (r, g, b) = (1, green_stride, blue_stride);
        // The tetrahedron holding the point is chosen by the order of its fractions; walk from
        // the cell's origin corner to the opposite one along the cube's edges in that order.
        let (first, second, weights) = if fr >= fg {
            if fg >= fb {
                (r, r + g, [fr, fg, fb])
            } else if fr >= fb {
                (r, r + b, [fr, fb, fg])
            } else {
                (b, r + b, [fb, fr, fg])
            }
        } else if fb >= fg {
            (b, g + b, [fb, fg, fr])
        } else if fb >= fr {
            (g, g + b, [fg, fb, fr])
        } else {
            (g, r + g, [fg, fr, fb])
        };
        let origin = at(0);
        let corner1 = at(first);
        let corner2 = at(second);
        let opposite = at(r + g + b);
        let blend = |channel: usize| {
            origin[channel]
                + weights[0] * (corner1[channel] - origin[channel])
                + weights[1] * (corner2[channel] - corner1[channel])
                + weights[2] * (opposite[channel] - corner2[channel])
        };
        [blend(0), blend(1), blend(2)]
    }
}
