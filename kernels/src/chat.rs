//! Chat templates: the GGUF's `tokenizer.chat_template` (Jinja) rendered with minijinja as
//! Hugging Face's `apply_chat_template` renders it (block trimming, Python's methods,
//! `raise_exception`, `strftime_now`), so that a chat request becomes exactly the text the
//! model was trained on.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// ChatML, used when a model file carries no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// The local time now in `format` (C's `strftime`), as Hugging Face's
/// `apply_chat_template` defines it for templates (Llama 3.2's date line, Mistral Small
/// 3.2's `today`); a format chrono cannot write is the template's error, not a panic.
fn strftime_now(format: String) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(out)
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        // As Hugging Face's `apply_chat_template` (and so vLLM, and llama.cpp's renderer):
        // a block tag's own line break and leading indentation are not output.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python's str, dict and list methods (`.strip()`, `.get()`, `.items()`,
        // `.startswith()` …), which templates written for jinja2 call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opening.
    pub fn render(&self, messages: &[Message<'_>]) -> Result<String, Error> {
        self.render_with(messages, None)
    }

    /// [`ChatTemplate::render`] with further variables for the template (a request's
    /// `chat_template_kwargs`: Qwen3's `enable_thinking`, …). The variables set here
    /// (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`) are not theirs to
    /// change: where `extra` names one, the template still sees this one.
    pub fn render_with(
        &self,
        messages: &[Message<'_>],
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, Error> {
        self.render_ctx(messages, extra, true)
    }

    /// The prompt text for `messages` whose last one (an assistant's) the answer goes on
    /// with (vLLM's `continue_final_message`): rendered without the assistant's turn
    /// opening, and cut right after that message's text (its end of turn, and whatever the
    /// template writes after it, dropped). Its text as written, or less its trailing
    /// whitespace where the template trims it; an error where the template writes neither.
    pub fn render_continuing(
        &self,
        messages: &[Message<'_>],
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, Error> {
        let text = self.render_ctx(messages, extra, false)?;
        let last = messages.last().map_or("", |m| m.content);
        [last, last.trim_end()]
            .into_iter()
            .filter(|t| !t.is_empty())
            .find_map(|t| text.rfind(t).map(|at| text[..at + t.len()].to_string()))
            .ok_or_else(|| {
                Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    "the chat template does not write the final message's text, so it cannot be continued",
                )
            })
    }

    fn render_ctx(
        &self,
        messages: &[Message<'_>],
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let own = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        };
        let ctx = match extra {
            Some(extra) => context! { ..own, ..minijinja::Value::from_serialize(extra) },
            None => own,
        };
        self.env.get_template("chat")?.render(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template written with plain block tags on lines of their own renders as Hugging
    /// Face's `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`): no line
    /// breaks or indentation from the tags themselves.
    #[test]
    fn block_tags_leave_no_line_breaks_or_indentation() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n>{% endif %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").expect("parses");
        let msgs = [
            Message {
                role: "user",
                content: "a",
            },
            Message {
                role: "assistant",
                content: "b",
            },
            Message {
                role: "user",
                content: "c",
            },
        ];
        // jinja2 with trim_blocks and lstrip_blocks gives the same.
        assert_eq!(t.render(&msgs).expect("renders"), "[a]\n[c]\n>");
    }

    /// vLLM's `continue_final_message`: the prompt stops right after the final message's
    /// text (no end of turn, no turn opened), whose trailing whitespace a template may
    /// trim; a template that does not write it cannot be continued.
    #[test]
    fn a_final_message_is_continued_where_its_text_ends() {
        let msgs = |last: &'static str| {
            [
                Message {
                    role: "user",
                    content: "Sure is a word",
                },
                Message {
                    role: "assistant",
                    content: last,
                },
            ]
        };
        let t = ChatTemplate::new(CHATML, "", "").expect("parses");
        assert_eq!(
            t.render_continuing(&msgs("Sure"), None).expect("renders"),
            "<|im_start|>user\nSure is a word<|im_end|>\n<|im_start|>assistant\nSure"
        );
        let trims = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "",
            "",
        )
        .expect("parses");
        assert_eq!(
            trims
                .render_continuing(&msgs("Sure, "), None)
                .expect("renders"),
            "<user>Sure is a word</user><assistant>Sure,"
        );
        let drops = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
            "",
            "",
        )
        .expect("parses");
        assert!(drops.render_continuing(&msgs("absent"), None).is_err());
    }

    /// `strftime_now` writes the date as the format asks; a format it cannot write is an
    /// error from `render`, not a panic; `is defined` sees it (Llama 3.2's test).
    #[test]
    fn strftime_now_is_defined_and_formats_today() {
        let t = ChatTemplate::new(
            "{% if strftime_now is defined %}{{ strftime_now('%Y-%m-%d|%d %b %Y') }}{% endif %}",
            "",
            "",
        )
        .expect("parses");
        let out = t.render(&[]).expect("renders");
        let (iso, human) = out.split_once('|').expect("two dates");
        let parts: Vec<&str> = iso.split('-').collect();
        assert_eq!(parts.len(), 3, "{out}");
        assert!(parts[0].parse::<u32>().expect("a year") >= 2024, "{out}");
        assert!(
            human.ends_with(parts[0]) && human.starts_with(parts[2]),
            "{out}"
        );
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", "", "").expect("parses");
        let err = bad.render(&[]).expect_err("an unwritable format");
        assert!(err.to_string().contains("strftime_now"), "{err}");
    }

    /// A request's own template variables reach the template (Qwen3's `enable_thinking`,
    /// its last lines), alongside the messages; ones naming the variables set here do not
    /// replace them.
    #[test]
    fn a_requests_variables_reach_the_template() {
        let t = ChatTemplate::new(
            "{{ messages[0].content }}|{% if add_generation_prompt %}gen{% endif %}|{{ bos_token }}|\
             {%- if enable_thinking is defined and enable_thinking is false %}no-think{% endif %}",
            "<s>",
            "</s>",
        )
        .expect("parses");
        let msgs = [Message {
            role: "user",
            content: "hi",
        }];
        assert_eq!(t.render(&msgs).expect("renders"), "hi|gen|<s>|");
        let args = |v: serde_json::Value| v.as_object().cloned().expect("an object");
        let off = args(serde_json::json!({"enable_thinking": false}));
        assert_eq!(
            t.render_with(&msgs, Some(&off)).expect("renders"),
            "hi|gen|<s>|no-think"
        );
        let on = args(serde_json::json!({"enable_thinking": true}));
        assert_eq!(
            t.render_with(&msgs, Some(&on)).expect("renders"),
            "hi|gen|<s>|"
        );
        let taken = args(serde_json::json!({
            "messages": [{"content": "other"}],
            "add_generation_prompt": false,
            "bos_token": "X"
        }));
        assert_eq!(
            t.render_with(&msgs, Some(&taken)).expect("renders"),
            "hi|gen|<s>|"
        );
    }

    /// What SmolLM3's template leans on renders as jinja2 renders it: a flag looked for in
    /// a system message that may not be there (an undefined value contains nothing), the
    /// flags cut out with `.replace()` and `.rstrip()`, a turn's leading line breaks with
    /// `.lstrip("\n")`, a namespace filled over a list with `| string`, and `is string`;
    /// `enable_thinking` from the request's variables decides the mode.
    #[test]
    fn smollm3s_constructs_render_as_jinja2s() {
        let source = r#"{%- set mode = "/think" if enable_thinking is not defined or enable_thinking else "/no_think" -%}
{%- if messages[0].role == "system" -%}
  {%- set system_message = messages[0].content -%}
  {%- if "/no_think" in system_message -%}{%- set mode = "/no_think" -%}{%- endif -%}
  {%- set custom = system_message.replace("/no_think", "").replace("/think", "").rstrip() -%}
{%- endif -%}
{%- if "/system_override" in system_message -%}override{%- else -%}mode {{ mode }}|{{ custom }}|{%- endif -%}
{%- if tools is defined -%}
  {%- set ns = namespace(text="<tools>") -%}
  {%- for tool in tools -%}{%- set ns.text = ns.text + (tool | string) + ";" -%}{%- endfor -%}
  {{- ns.text -}}|
{%- endif -%}
{%- for m in messages if m.role != "system" -%}
  {%- set content = m.content if m.content is string else "" -%}
  [{{ m.role }}:{{ content.lstrip("
") }}]
{%- endfor -%}
{%- if add_generation_prompt and mode == "/no_think" %}<think>

</think>
{% endif -%}"#;
        let t = ChatTemplate::new(source, "", "").expect("parses");
        let user = Message {
            role: "user",
            content: "\n\nhi",
        };
        assert_eq!(
            t.render(std::slice::from_ref(&user)).expect("renders"),
            "mode /think||[user:hi]"
        );
        let system = Message {
            role: "system",
            content: "Be brief. /no_think  ",
        };
        assert_eq!(
            t.render(&[system, user.clone()]).expect("renders"),
            "mode /no_think|Be brief.|[user:hi]<think>\n\n</think>\n"
        );
        let args = serde_json::json!({"enable_thinking": false, "tools": ["f", 1]});
        assert_eq!(
            t.render_with(&[user], args.as_object()).expect("renders"),
            "mode /no_think||<tools>f;1;|[user:hi]<think>\n\n</think>\n"
        );
    }
}
