//! Skeletons drawn as OpenPose ControlNets saw them in training (the annotator's
//! `draw_bodypose`): on black, each of the first 17 limbs a filled ellipse 4 px thick along the
//! limb in its colour at 60 %, then each part a filled disc of radius 4 in its full colour, one
//! person after another. The shapes follow OpenCV's rasterisation (polygonised ellipses at 1°,
//! its integer circle), so a drawing differs from the annotator's only on a few edge pixels.

use image::{Rgb, RgbImage};

use super::skeleton::{LIMBS, PARTS};

/// One person's parts as fractions of the image's width and height (`None`: not found).
pub type Keypoints = [Option<(f64, f64)>; PARTS];

/// The colour of each limb (the first 17 of [`LIMBS`]) and of each part.
pub const COLORS: [[u8; 3]; PARTS] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

const LIMBS_DRAWN: usize = 17;
const STICK_WIDTH: i64 = 4;
const JOINT_RADIUS: i64 = 4;

/// Draws `people` on `canvas`.
pub fn draw_people(canvas: &mut RgbImage, people: &[Keypoints]) {
    let (width, height) = (f64::from(canvas.width()), f64::from(canvas.height()));
    for keypoints in people {
        for (&(a, b), color) in LIMBS.iter().take(LIMBS_DRAWN).zip(COLORS) {
            let (Some((x1, y1)), Some((x2, y2))) = (keypoints[a - 1], keypoints[b - 1]) else {
                continue;
            };
            let (x1, x2, y1, y2) = (x1 * width, x2 * width, y1 * height, y2 * height);
            let center = (((x1 + x2) / 2.0) as i64, ((y1 + y2) / 2.0) as i64);
            let length = ((y1 - y2).powi(2) + (x1 - x2).powi(2)).sqrt();
            let angle = (y1 - y2).atan2(x1 - x2).to_degrees() as i64;
            let polygon = ellipse_polygon(center, ((length / 2.0) as i64, STICK_WIDTH), angle);
            let dimmed = color.map(|c| (f64::from(c) * 0.6) as u8);
            fill_convex_polygon(canvas, &polygon, Rgb(dimmed));
        }
        for (keypoint, color) in keypoints.iter().zip(COLORS) {
            if let Some((x, y)) = keypoint {
                let center = ((x * width) as i64, (y * height) as i64);
                fill_circle(canvas, center, JOINT_RADIUS, Rgb(color));
            }
        }
    }
}

/// The outline of an ellipse with half-axes `axes` rotated by `angle` degrees, one vertex per
/// degree, rounded to pixels, repeated vertices dropped (OpenCV's `ellipse2Poly`).
fn ellipse_polygon(center: (i64, i64), axes: (i64, i64), angle: i64) -> Vec<(i64, i64)> {
    let angle = (angle.rem_euclid(360)) as f64;
    let (sin, cos) = angle.to_radians().sin_cos();
    let mut points: Vec<(i64, i64)> = Vec::with_capacity(361);
    for degree in 0..=360 {
        let (s, c) = f64::from(degree).to_radians().sin_cos();
        let x = axes.0 as f64 * c;
        let y = axes.1 as f64 * s;
        let point = (
            (center.0 as f64 + x * cos - y * sin).round_ties_even() as i64,
            (center.1 as f64 + x * sin + y * cos).round_ties_even() as i64,
        );
        if points.last() != Some(&point) {
            points.push(point);
        }
    }
    points
}

/// Fills a convex polygon: each row between its left and right edges, and the outline.
fn fill_convex_polygon(canvas: &mut RgbImage, polygon: &[(i64, i64)], color: Rgb<u8>) {
    let Some(top) = polygon.iter().map(|p| p.1).min() else {
        return;
    };
    let bottom = polygon.iter().map(|p| p.1).max().unwrap_or(top);
    let edges: Vec<((i64, i64), (i64, i64))> = polygon
        .iter()
        .zip(polygon.iter().cycle().skip(1))
        .map(|(&a, &b)| (a, b))
        .collect();
    for y in top..=bottom {
        let mut span: Option<(f64, f64)> = None;
        for &((x0, y0), (x1, y1)) in &edges {
            if (y < y0.min(y1)) || (y > y0.max(y1)) {
                continue;
            }
            let xs = if y0 == y1 {
                [x0 as f64, x1 as f64]
            } else {
                let x = x0 as f64 + (y - y0) as f64 * (x1 - x0) as f64 / (y1 - y0) as f64;
                [x, x]
            };
            for x in xs {
                span = Some(match span {
                    None => (x, x),
                    Some((left, right)) => (left.min(x), right.max(x)),
                });
            }
        }
        if let Some((left, right)) = span {
            let (left, right) = (left.round() as i64, right.round() as i64);
            horizontal_line(canvas, y, left, right, color);
        }
    }
    for &(a, b) in &edges {
        line(canvas, a, b, color);
    }
}

/// An 8-connected line (Bresenham).
fn line(canvas: &mut RgbImage, (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = ((x1 - x).signum(), (y1 - y).signum());
    let mut error = dx + dy;
    loop {
        put(canvas, x, y, color);
        if x == x1 && y == y1 {
            break;
        }
        let doubled = 2 * error;
        if doubled >= dy {
            error += dy;
            x += sx;
        }
        if doubled <= dx {
            error += dx;
            y += sy;
        }
    }
}

/// A filled circle as OpenCV draws one of integer radius (its midpoint walk, filled with
/// horizontal lines).
fn fill_circle(canvas: &mut RgbImage, (cx, cy): (i64, i64), radius: i64, color: Rgb<u8>) {
    let (mut error, mut dx, mut dy) = (0i64, radius, 0i64);
    let (mut plus, mut minus) = (1i64, (radius << 1) - 1);
    while dx >= dy {
        horizontal_line(canvas, cy - dy, cx - dx, cx + dx, color);
        horizontal_line(canvas, cy + dy, cx - dx, cx + dx, color);
        horizontal_line(canvas, cy - dx, cx - dy, cx + dy, color);
        horizontal_line(canvas, cy + dx, cx - dy, cx + dy, color);
        dy += 1;
        error += plus;
        plus += 2;
        let mask = if error <= 0 { 0 } else { -1 };
        error -= minus & mask;
        dx += mask;
        minus -= mask & 2;
    }
}

/// Pixels `left..=right` of row `y`, clipped to the canvas.
fn horizontal_line(canvas: &mut RgbImage, y: i64, left: i64, right: i64, color: Rgb<u8>) {
    for x in left..=right {
        put(canvas, x, y, color);
    }
}

fn put(canvas: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>) {
    if let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y))
        && x < canvas.width()
        && y < canvas.height()
    {
        canvas.put_pixel(x, y, color);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disc_of_radius_4_is_opencvs() {
        let mut canvas = RgbImage::new(11, 11);
        fill_circle(&mut canvas, (5, 5), 4, Rgb([255, 0, 0]));
        let rows: Vec<String> = (0..11)
            .map(|y| {
                (0..11)
                    .map(|x| {
                        if canvas.get_pixel(x, y)[0] > 0 {
                            '#'
                        } else {
                            '.'
                        }
                    })
                    .collect()
            })
            .collect();
        // cv2.circle(np.zeros((11, 11), np.uint8), (5, 5), 4, 255, -1)
        let expected = [
            "...........",
            ".....#.....",
            "...#####...",
            "..#######..",
            "..#######..",
            ".#########.",
            "..#######..",
            "..#######..",
            "...#####...",
            ".....#.....",
            "...........",
        ];
        assert_eq!(rows, expected);
    }

    #[test]
    fn shapes_are_clipped_at_the_edges() {
        let mut canvas = RgbImage::new(8, 8);
        fill_circle(&mut canvas, (0, 0), 4, Rgb([1, 2, 3]));
        let polygon = ellipse_polygon((7, 7), (10, 4), -45);
        fill_convex_polygon(&mut canvas, &polygon, Rgb([4, 5, 6]));
        assert_eq!(canvas.get_pixel(0, 0), &Rgb([1, 2, 3]));
        assert_eq!(canvas.get_pixel(7, 7), &Rgb([4, 5, 6]));
    }
}
