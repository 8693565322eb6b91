//! From the body network's maps to people: the part-affinity-field parse of OpenPose (Cao et
//! al., CVPR 2017, section 2.4), with the constants and tie-breaking of the annotator OpenPose
//! ControlNets were trained with, so the same maps give the same skeletons.
//!
//! 1. **Peaks**: each part's heatmap is smoothed (Gaussian, σ = 3 px, mirrored edges); a pixel
//!    at least as high as its four neighbours and above 0.1 is a candidate part, scored by the
//!    unsmoothed heatmap. A part keeps at most [`MAX_PEAKS_PER_PART`] candidates, the highest
//!    (a trained model marks a few per person; a flat, saturated heatmap — a plateau where every
//!    pixel ties its neighbours — would otherwise make every pixel one, and the limb search
//!    quadratic in them).
//! 2. **Limbs**: for each of the 19 limbs, every pair of candidates of its two parts is scored
//!    by the affinity field sampled at 10 points between them, projected on the pair's
//!    direction; pairs with at least 9 samples above 0.05 and a positive mean (less a penalty for
//!    limbs longer than half the image height) are taken greedily, best first, each candidate at
//!    most once.
//! 3. **People**: limbs sharing a part are joined into people; people with fewer than 4 parts or
//!    a mean score under 0.4 are dropped.

/// Parts of the COCO body model, in the network's heatmap order.
pub const PARTS: usize = 18;

/// The parts' names, in the network's order (right and left are the person's own).
pub const PART_NAMES: [&str; PARTS] = [
    "nose",
    "neck",
    "right shoulder",
    "right elbow",
    "right wrist",
    "left shoulder",
    "left elbow",
    "left wrist",
    "right hip",
    "right knee",
    "right ankle",
    "left hip",
    "left knee",
    "left ankle",
    "right eye",
    "left eye",
    "right ear",
    "left ear",
];

/// The limbs as (part, part) pairs, 1-based as in the model's documentation: neck–shoulders,
/// arms, neck–hips, legs, neck–nose, nose–eyes–ears, and ears–shoulders.
pub const LIMBS: [(usize, usize); 19] = [
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
    (3, 17),
    (6, 18),
];

/// The affinity field channels (x, y) of each limb of [`LIMBS`].
const LIMB_FIELDS: [(usize, usize); 19] = [
    (12, 13),
    (20, 21),
    (14, 15),
    (16, 17),
    (22, 23),
    (24, 25),
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (8, 9),
    (10, 11),
    (28, 29),
    (30, 31),
    (34, 35),
    (32, 33),
    (36, 37),
    (18, 19),
    (26, 27),
];

/// Candidates kept per part: far more than people in any photo a studio renders.
pub const MAX_PEAKS_PER_PART: usize = 64;

const SIGMA: f64 = 3.0;
const PEAK_THRESHOLD: f64 = 0.1;
const FIELD_THRESHOLD: f64 = 0.05;
const SAMPLES: usize = 10;
/// Of [`SAMPLES`], more than this many must be above [`FIELD_THRESHOLD`].
const SAMPLES_NEEDED: f64 = 0.8 * SAMPLES as f64;
/// Only the first 17 limbs may start a person (the ear–shoulder limbs only join parts).
const LIMBS_STARTING_PEOPLE: usize = 17;
const MIN_PARTS: usize = 4;
const MIN_MEAN_SCORE: f64 = 0.4;

/// The network's maps at the image's resolution, channel by channel (row-major planes).
#[derive(Debug, Clone)]
pub struct PartMaps {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The 18 parts' heatmaps (the background channel is not used).
    pub heatmaps: Vec<Vec<f32>>,
    /// The 38 affinity-field channels.
    pub fields: Vec<Vec<f32>>,
}

/// A candidate part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Column.
    pub x: usize,
    /// Row.
    pub y: usize,
    /// The heatmap's value there.
    pub score: f64,
}

/// One person: the candidate (index into the peaks, in part order) of each part, if found.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    /// Candidate index of each of the 18 parts.
    pub parts: [Option<usize>; PARTS],
    /// Sum of the parts' and limbs' scores.
    pub score: f64,
    /// How many parts were found.
    pub part_count: usize,
}

/// The people in `maps`: all candidate parts (every part's in turn, each part's in row-major
/// order) and the people made of them.
pub fn parse(maps: &PartMaps) -> (Vec<Peak>, Vec<Person>) {
    let peaks_by_part = peaks_of_every_part(maps);
    let mut first_id = Vec::with_capacity(PARTS);
    let mut candidates = Vec::new();
    for peaks in &peaks_by_part {
        first_id.push(candidates.len());
        candidates.extend_from_slice(peaks);
    }
    let connections: Vec<Option<Vec<Connection>>> = LIMBS
        .iter()
        .zip(LIMB_FIELDS)
        .map(|(&(a, b), (fx, fy))| {
            let (peaks_a, peaks_b) = (&peaks_by_part[a - 1], &peaks_by_part[b - 1]);
            if peaks_a.is_empty() || peaks_b.is_empty() {
                return None;
            }
            let fields = (&maps.fields[fx][..], &maps.fields[fy][..]);
            Some(connect(
                peaks_a,
                peaks_b,
                (first_id[a - 1], first_id[b - 1]),
                fields,
                maps.width,
                maps.height,
            ))
        })
        .collect();
    let people = assemble(&candidates, &connections);
    (candidates, people)
}

/// [`find_peaks`] of each part's heatmap, the parts shared among the machine's cores.
fn peaks_of_every_part(maps: &PartMaps) -> Vec<Vec<Peak>> {
    let heatmaps = &maps.heatmaps[..PARTS.min(maps.heatmaps.len())];
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let per_thread = heatmaps.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = heatmaps
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|heatmap| find_peaks(heatmap, maps.width, maps.height))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| match worker.join() {
                Ok(peaks) => peaks,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Local maxima of the smoothed heatmap above the threshold, row-major.
fn find_peaks(heatmap: &[f32], width: usize, height: usize) -> Vec<Peak> {
    let smoothed = gaussian_blur(heatmap, width, height, SIGMA);
    let at = |x: usize, y: usize| smoothed[y * width + x];
    let mut peaks = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let value = at(x, y);
            // Neighbours outside the image count as 0.
            let up = if y > 0 { at(x, y - 1) } else { 0.0 };
            let down = if y + 1 < height { at(x, y + 1) } else { 0.0 };
            let left = if x > 0 { at(x - 1, y) } else { 0.0 };
            let right = if x + 1 < width { at(x + 1, y) } else { 0.0 };
            if value >= up
                && value >= down
                && value >= left
                && value >= right
                && value > PEAK_THRESHOLD
            {
                peaks.push((
                    value,
                    Peak {
                        x,
                        y,
                        score: f64::from(heatmap[y * width + x]),
                    },
                ));
            }
        }
    }
    if peaks.len() > MAX_PEAKS_PER_PART {
        // The highest smoothed values (the first of equals), kept in row-major order.
        let mut order: Vec<usize> = (0..peaks.len()).collect();
        order.sort_by(|&a, &b| peaks[b].0.total_cmp(&peaks[a].0));
        order.truncate(MAX_PEAKS_PER_PART);
        order.sort_unstable();
        return order.into_iter().map(|i| peaks[i].1).collect();
    }
    peaks.into_iter().map(|(_, peak)| peak).collect()
}

/// A separable Gaussian blur (radius 4σ, mirrored edges `d c b a | a b c d`), in f64: scipy's
/// `ndimage.gaussian_filter` as the annotator calls it.
fn gaussian_blur(plane: &[f32], width: usize, height: usize, sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as usize;
    let mut weights: Vec<f64> = (0..=radius)
        .map(|i| (-0.5 / (sigma * sigma) * (i * i) as f64).exp())
        .collect();
    let total = weights[0] + 2.0 * weights[1..].iter().sum::<f64>();
    for w in &mut weights {
        *w /= total;
    }
    let mirror = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let period = 2 * n;
        let mut i = i.rem_euclid(period);
        if i >= n {
            i = period - 1 - i;
        }
        i as usize
    };
    let source: Vec<f64> = plane.iter().map(|&v| f64::from(v)).collect();
    // Along the columns first (axis 0), then the rows, as scipy goes axis by axis; each output
    // is `centre·w0 + Σ (before + after)·wk`, k = 1…radius, in that order.
    let mut columns = vec![0.0; width * height];
    for (y, out) in columns.chunks_exact_mut(width).enumerate() {
        let row = |index: usize| &source[index * width..(index + 1) * width];
        for (o, c) in out.iter_mut().zip(row(y)) {
            *o = c * weights[0];
        }
        for (k, w) in weights.iter().enumerate().skip(1) {
            let above = row(mirror(y as isize - k as isize, height));
            let below = row(mirror((y + k) as isize, height));
            for ((o, a), b) in out.iter_mut().zip(above).zip(below) {
                *o += (a + b) * w;
            }
        }
    }
    let mut padded = vec![0.0; width + 2 * radius];
    let mut result = vec![0.0; width * height];
    for (row, out) in columns
        .chunks_exact(width)
        .zip(result.chunks_exact_mut(width))
    {
        for (i, p) in padded.iter_mut().enumerate() {
            *p = row[mirror(i as isize - radius as isize, width)];
        }
        for (x, o) in out.iter_mut().enumerate() {
            let centre = x + radius;
            let mut sum = padded[centre] * weights[0];
            for (k, w) in weights.iter().enumerate().skip(1) {
                sum += (padded[centre - k] + padded[centre + k]) * w;
            }
            *o = sum;
        }
    }
    result
}

/// A limb chosen between two candidates.
#[derive(Debug, Clone, Copy)]
struct Connection {
    /// Candidate index of the first part.
    a: usize,
    /// Candidate index of the second part.
    b: usize,
    /// The affinity score.
    score: f64,
}

/// The limbs between `peaks_a` and `peaks_b` (their first candidate indices `ids`), greedily.
fn connect(
    peaks_a: &[Peak],
    peaks_b: &[Peak],
    ids: (usize, usize),
    (field_x, field_y): (&[f32], &[f32]),
    width: usize,
    height: usize,
) -> Vec<Connection> {
    let mut scored = Vec::new();
    for (i, a) in peaks_a.iter().enumerate() {
        for (j, b) in peaks_b.iter().enumerate() {
            let dx = b.x as f64 - a.x as f64;
            let dy = b.y as f64 - a.y as f64;
            let norm = (dx * dx + dy * dy).sqrt().max(0.001);
            let (ux, uy) = (dx / norm, dy / norm);
            let xs = linspace(a.x as f64, b.x as f64);
            let ys = linspace(a.y as f64, b.y as f64);
            let projections: Vec<f64> = xs
                .iter()
                .zip(&ys)
                .map(|(&x, &y)| {
                    let col = (x.round_ties_even() as usize).min(width - 1);
                    let row = (y.round_ties_even() as usize).min(height - 1);
                    let k = row * width + col;
                    f64::from(field_x[k]) * ux + f64::from(field_y[k]) * uy
                })
                .collect();
            let mean = projections.iter().fold(0.0, |sum, p| sum + p) / SAMPLES as f64;
            let score = mean + (0.5 * height as f64 / norm - 1.0).min(0.0);
            let above = projections.iter().filter(|&&p| p > FIELD_THRESHOLD).count();
            if above as f64 > SAMPLES_NEEDED && score > 0.0 {
                scored.push((i, j, score));
            }
        }
    }
    // Best first; equal scores keep their (i, j) order (a stable sort).
    scored.sort_by(|x, y| y.2.total_cmp(&x.2));
    let most = peaks_a.len().min(peaks_b.len());
    let mut chosen: Vec<(usize, usize, f64)> = Vec::with_capacity(most);
    for (i, j, score) in scored {
        if chosen.iter().all(|&(ci, cj, _)| ci != i && cj != j) {
            chosen.push((i, j, score));
            if chosen.len() >= most {
                break;
            }
        }
    }
    chosen
        .into_iter()
        .map(|(i, j, score)| Connection {
            a: ids.0 + i,
            b: ids.1 + j,
            score,
        })
        .collect()
}

/// numpy's `linspace(start, stop, SAMPLES)`: `start + k·step`, the last exactly `stop`.
fn linspace(start: f64, stop: f64) -> [f64; SAMPLES] {
    let step = (stop - start) / (SAMPLES - 1) as f64;
    let mut points = [0.0; SAMPLES];
    for (k, point) in points.iter_mut().enumerate() {
        *point = k as f64 * step + start;
    }
    points[SAMPLES - 1] = stop;
    points
}

/// Joins limbs into people (limbs of a part missing from the image are `None`).
fn assemble(candidates: &[Peak], connections: &[Option<Vec<Connection>>]) -> Vec<Person> {
    let mut people: Vec<Person> = Vec::new();
    for (k, limbs) in connections.iter().enumerate() {
        let Some(limbs) = limbs else { continue };
        let (part_a, part_b) = (LIMBS[k].0 - 1, LIMBS[k].1 - 1);
        for limb in limbs {
            // At most two people can hold a limb's parts (one each); the annotator fails on a
            // third, which well-formed parses never produce: later ones are ignored here.
            let mut holders = [0usize; 2];
            let mut found = 0;
            for (index, person) in people.iter().enumerate() {
                if person.parts[part_a] == Some(limb.a) || person.parts[part_b] == Some(limb.b) {
                    if found < 2 {
                        holders[found] = index;
                    }
                    found += 1;
                }
            }
            match found {
                0 => {
                    if k < LIMBS_STARTING_PEOPLE {
                        let mut parts = [None; PARTS];
                        parts[part_a] = Some(limb.a);
                        parts[part_b] = Some(limb.b);
                        people.push(Person {
                            parts,
                            score: candidates[limb.a].score + candidates[limb.b].score + limb.score,
                            part_count: 2,
                        });
                    }
                }
                1 => {
                    let person = &mut people[holders[0]];
                    if person.parts[part_b] != Some(limb.b) {
                        add_part(person, part_b, limb, candidates);
                    }
                }
                _ => {
                    let (first, second) = (holders[0], holders[1]);
                    let disjoint = (0..PARTS).all(|part| {
                        people[first].parts[part].is_none() || people[second].parts[part].is_none()
                    });
                    if disjoint {
                        let merged = people.remove(second);
                        let person = &mut people[first];
                        for (mine, theirs) in person.parts.iter_mut().zip(merged.parts) {
                            if mine.is_none() {
                                *mine = theirs;
                            }
                        }
                        person.score += merged.score;
                        person.part_count += merged.part_count;
                        person.score += limb.score;
                    } else {
                        add_part(&mut people[first], part_b, limb, candidates);
                    }
                }
            }
        }
    }
    people.retain(|person| {
        person.part_count >= MIN_PARTS && person.score / person.part_count as f64 >= MIN_MEAN_SCORE
    });
    people
}

fn add_part(person: &mut Person, part: usize, limb: &Connection, candidates: &[Peak]) {
    person.parts[part] = Some(limb.b);
    person.part_count += 1;
    person.score += candidates[limb.b].score + limb.score;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blur_keeps_the_mass_and_mirrors_at_the_edges() {
        let (width, height) = (7, 5);
        let plane = vec![1.0f32; width * height];
        for value in gaussian_blur(&plane, width, height, 3.0) {
            assert!((value - 1.0).abs() < 1e-12, "{value}");
        }
        let mut spike = vec![0.0f32; width * height];
        spike[2 * width + 3] = 1.0;
        let blurred = gaussian_blur(&spike, width, height, 1.0);
        // Symmetric around the spike.
        assert!((blurred[2 * width + 2] - blurred[2 * width + 4]).abs() < 1e-15);
        assert!((blurred[width + 3] - blurred[3 * width + 3]).abs() < 1e-15);
        // All the mass stays inside (mirrored, not lost at the edges).
        let total: f64 = blurred.iter().sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
    }

    #[test]
    fn linspace_ends_exactly_at_both_points() {
        let points = linspace(3.0, 10.0);
        assert_eq!(points[0], 3.0);
        assert_eq!(points[SAMPLES - 1], 10.0);
        assert!((points[1] - (3.0 + 7.0 / 9.0)).abs() < 1e-12);
    }

    #[test]
    fn a_flat_saturated_heatmap_gives_a_bounded_number_of_candidates() {
        let (width, height) = (96, 64);
        let mut heatmap = vec![0.9f32; width * height];
        // One real peak above the plateau is always kept.
        heatmap[40 * width + 50] = 3.0;
        let peaks = find_peaks(&heatmap, width, height);
        assert_eq!(peaks.len(), MAX_PEAKS_PER_PART);
        assert!(peaks.iter().any(|p| (p.x, p.y) == (50, 40)));
        assert!(
            peaks
                .windows(2)
                .all(|w| (w[0].y, w[0].x) < (w[1].y, w[1].x))
        );
        let maps = PartMaps {
            width,
            height,
            heatmaps: vec![heatmap; 19],
            fields: vec![vec![1.0; width * height]; 38],
        };
        let (candidates, _) = parse(&maps);
        assert_eq!(candidates.len(), PARTS * MAX_PEAKS_PER_PART);
    }

    #[test]
    fn empty_maps_hold_no_people() {
        let (width, height) = (16, 12);
        let maps = PartMaps {
            width,
            height,
            heatmaps: vec![vec![0.0; width * height]; 19],
            fields: vec![vec![0.0; width * height]; 38],
        };
        let (candidates, people) = parse(&maps);
        assert!(candidates.is_empty());
        assert!(people.is_empty());
    }
}
