//! The wasm-bindgen entry point: the app in the page's canvas, and `window.dtopp`.

use std::cell::RefCell;
use std::rc::Rc;

use dtopp_desktop::sources::SourceKind;
use dtopp_desktop::{DesktopApp, StartOptions};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::commands::{Command, Commands};
use crate::status::history;
use crate::web_app::{Published, WebApp};

/// Starts the demo in the `<canvas id=canvas_id>`. The routing backend is WebGPU when the
/// browser offers an adapter, unless the page's address has `?backend=cpu`.
#[wasm_bindgen]
pub async fn start(canvas_id: String) -> Result<(), JsValue> {
    let window = web_sys::window().ok_or("no window: the demo must run in a page")?;
    let document = window.document().ok_or("the window has no document")?;
    let canvas = document
        .get_element_by_id(&canvas_id)
        .ok_or_else(|| format!("no element with id {canvas_id:?} in the page"))?
        .dyn_into::<web_sys::HtmlCanvasElement>()
        .map_err(|_| format!("element {canvas_id:?} is not a <canvas>"))?;
    let search = window.location().search()?;
    let params = web_sys::UrlSearchParams::new_with_str(&search)?;
    let backend = params.get("backend");
    let use_gpu = match backend.as_deref() {
        None | Some("webgpu" | "gpu") => true,
        Some("cpu") => false,
        Some(other) => {
            return Err(format!("?backend={other}: expected webgpu or cpu").into());
        }
    };
    let status_element = document.get_element_by_id("dtopp-status");

    let commands = Rc::new(RefCell::new(Commands::default()));
    let published = Rc::new(RefCell::new(Published::default()));
    install_api(&window, &commands, &published)?;

    eframe::WebRunner::new()
        .start(
            canvas,
            eframe::WebOptions::default(),
            Box::new(move |cc| {
                let mut app = DesktopApp::new(cc, StartOptions::default());
                let settings = app.settings_mut();
                settings.source = SourceKind::Simulator;
                settings.sim.gpu = use_gpu;
                Ok(Box::new(WebApp::new(
                    app,
                    commands,
                    published,
                    status_element,
                )))
            }),
        )
        .await
}

/// `window.dtopp`: setTarget(t), stepChange(), reset(), run(bool), status(), history().
fn install_api(
    window: &web_sys::Window,
    commands: &Rc<RefCell<Commands>>,
    published: &Rc<RefCell<Published>>,
) -> Result<(), JsValue> {
    let api = js_sys::Object::new();
    let set = |name: &str, f: JsValue| js_sys::Reflect::set(&api, &name.into(), &f).map(|_| ());

    let c = commands.clone();
    set(
        "setTarget",
        Closure::<dyn Fn(f64) -> Result<(), JsValue>>::new(move |t: f64| {
            c.borrow_mut()
                .set_target(t)
                .map_err(|e| js_sys::Error::new(&e).into())
        })
        .into_js_value(),
    )?;
    for (name, command) in [
        ("stepChange", Command::StepChange),
        ("reset", Command::Reset),
    ] {
        let c = commands.clone();
        set(
            name,
            Closure::<dyn Fn()>::new(move || c.borrow_mut().push(command.clone())).into_js_value(),
        )?;
    }
    let c = commands.clone();
    set(
        "run",
        Closure::<dyn Fn(bool)>::new(move |running: bool| {
            c.borrow_mut().push(Command::Run(running))
        })
        .into_js_value(),
    )?;
    let p = published.clone();
    set(
        "status",
        Closure::<dyn Fn() -> JsValue>::new(move || match &p.borrow().status {
            Some(s) => js_sys::JSON::parse(&s.to_string()).unwrap_or(JsValue::NULL),
            None => JsValue::NULL,
        })
        .into_js_value(),
    )?;
    let p = published.clone();
    set(
        "history",
        Closure::<dyn Fn() -> JsValue>::new(move || {
            js_sys::JSON::parse(&history(&p.borrow().steps).to_string()).unwrap_or(JsValue::NULL)
        })
        .into_js_value(),
    )?;
    js_sys::Reflect::set(window, &"dtopp".into(), &api)?;
    Ok(())
}
