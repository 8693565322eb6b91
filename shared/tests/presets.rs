//! Presets: the built-ins, validation errors that name the field, user overrides, lookups.

use darkroom_events::FailureReason;
use darkroom_shared::preset::{ControlKind, Preset, PresetError, PresetLibrary, Resolution};

const MINIMAL: &str = "name = \"mine\"\nprompt = \"a portrait of {subject}\"\n";

fn invalid_field(result: Result<Preset, PresetError>) -> String {
    match result {
        Err(PresetError::Invalid { field, .. }) => field,
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn every_builtin_parses_and_validates() {
    let library = PresetLibrary::builtin().expect("built-ins are valid");
    let names: Vec<&str> = library.names().collect();
    assert_eq!(
        names,
        ["desk-setup", "profile-cool", "profile-warm", "storybook"]
    );
    for name in names {
        let preset = library.get(name).expect("present");
        assert_eq!(preset.name, name);
        preset.validate().expect("valid");
        assert!(!preset.prompt.is_empty() && !preset.negative_prompt.is_empty());
    }
}

#[test]
fn the_readme_examples_are_valid_presets() {
    let readme = include_str!("../presets/README.md");
    let examples: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .collect();
    assert_eq!(examples.len(), 2, "the README's TOML examples");
    for example in examples {
        let name = example
            .lines()
            .find_map(|line| line.strip_prefix("name = \""))
            .and_then(|rest| rest.strip_suffix('"'))
            .expect("an example names its preset");
        let preset = Preset::from_toml(name, example)
            .unwrap_or_else(|e| panic!("README example {name}: {e}"));
        preset.validate().expect("valid");
    }
}

#[test]
fn builtin_portraits_need_one_level_face_and_tone() {
    let library = PresetLibrary::builtin().expect("built-ins are valid");
    for (name, kelvin) in [("profile-warm", 5200.0), ("profile-cool", 7500.0)] {
        let preset = library.get(name).expect("present");
        let face = preset.face.expect("portraits frame a face");
        assert!(face.required && face.eyes_level);
        assert_eq!(preset.tone.as_ref().map(|t| t.temperature_k), Some(kelvin));
        assert_eq!(preset.control_kinds(), [ControlKind::Canny]);
        assert_eq!(preset.resolution, Resolution::Bucket);
    }
    for name in ["storybook", "desk-setup"] {
        assert!(library.get(name).expect("present").face.is_none(), "{name}");
    }
    let storybook = library.get("storybook").expect("present");
    assert_eq!(storybook.loras[0].name, "storybook-style.safetensors");
    assert_eq!(
        storybook.render_prompt("a cat").split(',').next(),
        Some("storybook illustration of a cat")
    );
}

#[test]
fn unknown_field_is_a_parse_error_naming_it() {
    let text = format!("{MINIMAL}stepz = 20\n");
    match Preset::from_toml("mine", &text) {
        Err(PresetError::Parse { name, message }) => {
            assert_eq!(name, "mine");
            assert!(message.contains("stepz"), "{message}");
        }
        other => panic!("expected Parse, got {other:?}"),
    }
    let nested = format!("{MINIMAL}[face]\nhead_ration = 0.4\n");
    match Preset::from_toml("mine", &nested) {
        Err(PresetError::Parse { message, .. }) => assert!(message.contains("head_ration")),
        other => panic!("expected Parse, got {other:?}"),
    }
}

#[test]
fn out_of_range_values_name_the_field() {
    let cases = [
        ("steps = 0", "steps"),
        ("steps = 151", "steps"),
        ("guidance = 30.5", "guidance"),
        ("guidance = -1.0", "guidance"),
        ("strength = 0.0", "strength"),
        ("strength = 1.01", "strength"),
        ("scheduler = \"dpm\"", "scheduler"),
        (
            "resolution = { width = 1000, height = 1020 }",
            "resolution.height",
        ),
        ("[face]\nhead_ratio = 1.0", "face.head_ratio"),
        ("[face]\nhead_ratio = 0.0", "face.head_ratio"),
        (
            "[[loras]]\nname = \"x.safetensors\"\nweight = nan",
            "loras[0].weight",
        ),
        ("[[loras]]\nname = \"../x.safetensors\"", "loras[0].name"),
        (
            "[[controlnets]]\nkind = \"canny\"\nmodel = \"c\"\nscale = -0.1",
            "controlnets[0].scale",
        ),
        (
            "[[controlnets]]\nkind = \"canny\"\nmodel = \"c\"\nstart = 0.5\nend = 0.5",
            "controlnets[0].start",
        ),
        (
            "[[controlnets]]\nkind = \"canny\"\nmodel = \"c\"\nend = 1.5",
            "controlnets[0].start",
        ),
        ("[tone]\ntemperature_k = 100", "tone.temperature_k"),
        ("[tone]\nstrength = 2.0", "tone.strength"),
        ("[tone]\nlut = \"film.png\"", "tone.lut"),
    ];
    for (extra, field) in cases {
        let text = format!("{MINIMAL}{extra}\n");
        assert_eq!(
            invalid_field(Preset::from_toml("mine", &text)),
            field,
            "{extra}"
        );
    }
    let bad_prompt = "name = \"mine\"\nprompt = \"a {subjet}\"\n";
    assert_eq!(
        invalid_field(Preset::from_toml("mine", bad_prompt)),
        "prompt"
    );
}

#[test]
fn bad_enum_values_are_parse_errors() {
    for extra in [
        "resolution = \"square\"",
        "[[controlnets]]\nkind = \"scribble\"\nmodel = \"c\"",
    ] {
        let text = format!("{MINIMAL}{extra}\n");
        assert!(
            matches!(
                Preset::from_toml("mine", &text),
                Err(PresetError::Parse { .. })
            ),
            "{extra}"
        );
    }
}

#[test]
fn name_must_match_the_file_stem() {
    assert_eq!(invalid_field(Preset::from_toml("theirs", MINIMAL)), "name");
}

#[test]
fn user_dir_overrides_builtins_and_adds_presets() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("profile-warm.toml"),
        "name = \"profile-warm\"\nprompt = \"house style {subject}\"\nsteps = 12\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("mine.toml"), MINIMAL).expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not a preset").expect("write");
    let library = PresetLibrary::builtin()
        .expect("built-ins")
        .with_dir(dir.path())
        .expect("user presets");
    let warm = library.get("profile-warm").expect("present");
    assert_eq!(warm.steps, 12);
    assert!(warm.face.is_none());
    assert!(library.get("mine").is_ok());
    assert_eq!(library.names().count(), 5);
}

#[test]
fn user_dir_with_a_mismatched_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("renamed.toml"), MINIMAL).expect("write");
    let error = PresetLibrary::builtin()
        .expect("built-ins")
        .with_dir(dir.path())
        .expect_err("mismatch");
    assert!(
        matches!(&error, PresetError::Invalid { name, field, .. } if name == "renamed" && field == "name"),
        "{error:?}"
    );
    assert_eq!(error.reason(), FailureReason::Internal);
}

#[test]
fn missing_user_dir_is_an_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = PresetLibrary::builtin()
        .expect("built-ins")
        .with_dir(dir.path().join("absent"))
        .expect_err("absent");
    assert!(matches!(error, PresetError::Io { .. }), "{error:?}");
}

#[test]
fn unknown_preset_lists_the_known_names_and_maps_to_unknown_preset() {
    let library = PresetLibrary::builtin().expect("built-ins");
    let error = library.get("profile-hot").expect_err("unknown");
    assert_eq!(
        error,
        PresetError::Unknown {
            name: "profile-hot".into(),
            known: vec![
                "desk-setup".into(),
                "profile-cool".into(),
                "profile-warm".into(),
                "storybook".into()
            ],
        }
    );
    assert_eq!(error.reason(), FailureReason::UnknownPreset);
    assert!(error.to_string().contains("profile-warm"));
}
