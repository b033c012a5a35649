"""`shoal run MODEL` on a terminal: the chat loop, modelled on Ollama's (cmd/interactive.go).

Messages accumulate and the whole conversation is sent with each turn. Ctrl-C while an
answer streams stops it (the connection closes, so the server aborts the request) and the
interrupted exchange is left out of the conversation; Ctrl-C at the prompt prints a hint;
Ctrl-D or /bye ends the chat.
"""
from __future__ import annotations

import os
from typing import Any

from shoal.cli.chat import (RunOptions, load_model, model_error, parse_parameter, print_summary,
                            stream_chat)
from shoal.cli.client import CliError, Client, ErrorReply, shoal_home
from shoal.cli.model_info import print_info, print_model_list, show_field

PROMPT = ">>> "
ALT_PROMPT = "... "
EXIT_HINT = "Use Ctrl + d or /bye to exit."

# Ollama's option names and their types (api.Options / api.Runner).

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.
"""

HELP_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
"""

HELP_SHOW = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""

HELP_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
   Alt + b            Move back (left) one word
   Alt + f            Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor

  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit shoal (/bye)
"""

HELP_PARAMETERS = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter num_gpu <int>          The number of layers to send to the GPU
  /set parameter stop <string> <string> ...   Set the stop parameters
"""


class _Input:
    """input() with GNU readline's editing and a history file (SHOAL_HOME/history)."""

    def __init__(self) -> None:
        self.readline = None
        self.history_file = shoal_home() / "history"
        self.save_history = os.environ.get("SHOAL_NOHISTORY", "").strip().lower() not in ("1", "true", "yes")
        try:
            import readline
        except ImportError:
            return
        self.readline = readline
        if self.save_history:
            try:
                self.history_file.parent.mkdir(parents=True, exist_ok=True)
                if self.history_file.exists():
                    readline.read_history_file(self.history_file)
                else:
                    self.history_file.touch()         # append_history_file() needs the file
            except OSError:
                pass
        readline.set_history_length(1000)

    def read(self, prompt: str) -> str:
        line = input(prompt)
        if self.readline is not None:
            # NOTE: readline itself adds each non-empty line to the session's history (up arrow).
            if self.save_history and line.strip():
                try:
                    self.readline.append_history_file(1, self.history_file)
                except OSError:
                    pass
        return line

    def pending(self) -> str:
        if self.readline is None:
            return ""
        try:
            return self.readline.get_line_buffer()
        except Exception:  # noqa: BLE001 - only a hint depends on it
            return ""


class Chat:
    def __init__(self, client: Client, opts: RunOptions) -> None:
        self.client = client
        self.opts = opts
        self.input = _Input()

    # ---- the loop -------------------------------------------------------------------------

    def loop(self) -> int:
        buffer: list[str] = []
        multiline: str | None = None            # None, "prompt" or "system"
        while True:
            try:
                line = self.input.read(ALT_PROMPT if multiline else PROMPT)
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                if not buffer and not multiline and not self.input.pending():
                    print(f"\n{EXIT_HINT}")
                else:
                    print()
                buffer, multiline = [], None
                continue

            if multiline:
                ended = line.endswith('"""')
                buffer.append(line[:-3] if ended else line)
                if not ended:
                    continue
                text = "\n".join(buffer)
                if multiline == "system":
                    buffer = []
                    multiline = None
                    self.set_system(text)
                    continue
                multiline = None
            elif line.startswith('"""'):
                rest = line[3:]
                if rest.endswith('"""') and len(rest) >= 3:
                    text = rest[:-3]
                else:
                    buffer = [rest]
                    multiline = "prompt"
                    continue
            elif line.startswith("/"):
                result = self.command(line)
                if result == "exit":
                    return 0
                if isinstance(result, tuple):           # /set system """...
                    multiline, buffer = result
                continue
            else:
                text = line
            buffer = []
            if text.strip():
                self.turn(text)

    def turn(self, text: str) -> None:
        user = {"role": "user", "content": text}
        messages = [*self.opts.messages, user]
        try:
            answer, final, interrupted = stream_chat(self.client, self.opts, messages, say_waiting=False)
        except ErrorReply as exc:
            print(f"\nerror: {model_error(exc, self.opts.model)}", flush=True)
            return
        except CliError as exc:
            print(f"\nerror: {exc}", flush=True)
            return
        print("\n" if answer.endswith("\n") else "\n\n", end="", flush=True)
        if interrupted:
            return
        self.opts.messages = [*messages, {"role": "assistant", "content": answer}]
        if self.opts.verbose and final:
            print_summary(final)

    # ---- slash commands -------------------------------------------------------------------

    def command(self, line: str):
        args = line.split()
        name = args[0]
        if name in ("/bye", "/exit"):
            return "exit"
        if name in ("/?", "/help"):
            topic = args[1].lstrip("/") if len(args) > 1 else ""
            print({"set": HELP_SET, "show": HELP_SHOW, "shortcut": HELP_SHORTCUTS,
                   "shortcuts": HELP_SHORTCUTS}.get(topic, HELP))
            return None
        if name == "/clear":
            self.opts.messages = [{"role": "system", "content": self.opts.system}] if self.opts.system else []
            print("Cleared session context")
            return None
        if name == "/set":
            return self.set_command(line, args)
        if name == "/show":
            self.show_command(args)
            return None
        if name == "/load":
            self.load_command(args)
            return None
        if name == "/save":
            self.save_command(args)
            return None
        if name == "/list":
            try:
                print_model_list(self.client, args[1] if len(args) > 1 else None)
            except CliError as exc:
                print(f"error: {exc}")
            return None
        print(f"Unknown command '{name}'. Type /? for help")
        return None

    def set_command(self, line: str, args: list[str]):
        if len(args) < 2:
            print(HELP_SET)
            return None
        what = args[1]
        opts = self.opts
        if what == "parameter":
            if len(args) < 4:
                print(HELP_PARAMETERS)
                return None
            try:
                value = parse_parameter(args[2], args[3:])
            except ValueError as exc:
                print(f"Couldn't set parameter: \"{exc}\"")
                return None
            opts.options[args[2]] = value
            print(f"Set parameter '{args[2]}' to '{', '.join(args[3:])}'")
        elif what == "system":
            if len(args) < 3:
                print(HELP_SET)
                return None
            text = line.split(None, 2)[2]
            if text.startswith('"""'):
                text = text[3:]
                if text.endswith('"""') and len(text) >= 3:
                    self.set_system(text[:-3])
                    return None
                return ("system", [text])
            self.set_system(text)
        elif what == "verbose":
            opts.verbose = True
            print("Set 'verbose' mode.")
        elif what == "quiet":
            opts.verbose = False
            print("Set 'quiet' mode.")
        elif what == "wordwrap":
            opts.wordwrap = True
            print("Set 'wordwrap' mode.")
        elif what == "nowordwrap":
            opts.wordwrap = False
            print("Set 'nowordwrap' mode.")
        elif what == "history":
            self.input.save_history = True
        elif what == "nohistory":
            self.input.save_history = False
        elif what == "format":
            if len(args) < 3 or args[2] != "json":
                print("Invalid or missing format. For 'json' mode use '/set format json'")
            else:
                opts.format = "json"
                print("Set format to 'json' mode.")
        elif what == "noformat":
            opts.format = ""
            print("Disabled format.")
        else:
            print(f"Unknown command '/set {what}'. Type /? for help")
        return None

    def set_system(self, text: str) -> None:
        self.opts.system = text
        message = {"role": "system", "content": text}
        if self.opts.messages and self.opts.messages[-1].get("role") == "system":
            self.opts.messages[-1] = message
        else:
            self.opts.messages.append(message)
        print("Set system message.")

    def show_command(self, args: list[str]) -> None:
        if len(args) < 2:
            print(HELP_SHOW)
            return
        what = args[1]
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            print(f"Unknown command '/show {what}'. Type /? for help")
            return
        body: dict[str, Any] = {}
        if self.opts.system:
            body["system"] = self.opts.system
        if self.opts.options:
            body["options"] = self.opts.options
        try:
            info = self.client.show(self.opts.model, **body)
        except CliError as exc:
            print(f"error: couldn't get model: {exc}")
            return
        if what == "info":
            # what this chat uses: the model's parameters with /set parameter's on top
            if self.opts.options:
                info = {**info, "parameters": _merged_parameters(str(info.get("parameters") or ""),
                                                                 self.opts.options)}
            if self.opts.system:
                info = {**info, "system": self.opts.system}
            print_info(info)
        elif what == "license":
            print(show_field(info, "license") or "No license was specified for this model.")
        elif what == "modelfile":
            print(info.get("modelfile") or "")
        elif what == "parameters":
            print("Model defined parameters:")
            params = str(info.get("parameters") or "")
            if params:
                for row in params.splitlines():
                    print(f"  {row}")
            else:
                print("  No additional parameters were specified for this model.")
            print()
            if self.opts.options:
                print("User defined parameters:")
                for key, value in self.opts.options.items():
                    print(f"  {key:<30} {_go_value(value)}")
                print()
        elif what == "system":
            if self.opts.system:
                print(self.opts.system + "\n")
            elif info.get("system"):
                print(str(info["system"]) + "\n")
            else:
                print("No system message was specified for this model.")
        elif what == "template":
            print(info.get("template") or "No prompt template was specified for this model.")

    def load_command(self, args: list[str]) -> None:
        if len(args) != 2:
            print("Usage:\n  /load <modelname>")
            return
        model = args[1]
        print(f"Loading model '{model}'")
        try:
            info = self.client.show(model)
        except ErrorReply as exc:
            if exc.not_found:
                print(f"Couldn't find model '{model}'")
            else:
                print(f"error: {exc.message}")
            return
        except CliError as exc:
            print(f"error: {exc}")
            return
        previous = self.opts.model
        self.opts.model = model
        self.opts.parent_model = str((info.get("details") or {}).get("parent_model") or "")
        try:
            load_model(self.client, self.opts)
        except CliError as exc:
            self.opts.model = previous
            print(f"error: {exc}")
            return
        self.opts.messages = []
        for message in info.get("messages") or []:
            self.opts.messages.append({"role": message.get("role"), "content": message.get("content", "")})

    def save_command(self, args: list[str]) -> None:
        if len(args) != 2:
            print("Usage:\n  /save <modelname>")
            return
        body: dict[str, Any] = {"model": args[1], "from": self.opts.parent_model or self.opts.model}
        if self.opts.system:
            body["system"] = self.opts.system
        if self.opts.options:
            body["parameters"] = self.opts.options
        if self.opts.messages:
            body["messages"] = self.opts.messages
        try:
            with self.client.stream("POST", "/api/create", body) as events:
                for _event in events:
                    pass
        except ErrorReply as exc:
            if exc.missing_endpoint:
                print(f"error: this server cannot save models ({exc.message})")
            else:
                print(f"error: {exc.message}")
            return
        except CliError as exc:
            print(f"error: {exc}")
            return
        print(f"Created new model '{args[1]}'")


def _merged_parameters(model_params: str, options: dict[str, Any]) -> str:
    """The model's `parameters` text (`name value` lines) with the session's options instead
    of the model's for the names both set (a list, like stop, gives one line per value)."""
    rows = [line for line in model_params.splitlines()
            if line.split(None, 1) and line.split(None, 1)[0] not in options]
    for name, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            rows.append(f"{name:<30} {_go_value(item)}")
    return "\n".join(rows)


def _go_value(value: Any) -> str:
    """A value as Go's %v prints it (lists as [a b])."""
    if isinstance(value, list):
        return "[" + " ".join(str(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
