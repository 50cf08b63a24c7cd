// The Remote Agents pages. Every read and change goes through Tether's admin REST API with the
// browser's Airflow session (same-origin, JSON), so the API decides who may do what.
(function () {
  "use strict";

  var main = document.getElementById("tether");
  var PAGE = main.dataset.page;
  var MAY_CHANGE = main.dataset.mayChange === "true";
  // This page is <airflow>/tether/ui/<page>: the API and Airflow's UI are found from there.
  var MOUNT = window.location.pathname.replace(/\/ui\/[^/]*$/, "");
  var API = MOUNT + "/v1";
  var AIRFLOW = MOUNT.replace(/\/tether$/, "");
  var REFRESH_MS = 5000;
  // Server clock minus ours, from each answer's Date header: "N s ago" is the server's.
  var skew = 0;

  // -- helpers ----------------------------------------------------------------------------

  function el(tag, attrs) {
    var node = document.createElement(tag);
    var children = Array.prototype.slice.call(arguments, 2);
    Object.keys(attrs || {}).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) return;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    });
    children.forEach(function (child) {
      if (child === null || child === undefined || child === false) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function $(id) { return document.getElementById(id); }

  function ApiError(status, detail, reason) {
    this.status = status;
    this.message = detail;
    this.reason = reason;
  }

  function api(method, path, body) {
    var init = { method: method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      if (body !== undefined) init.body = JSON.stringify(body);
    }
    return fetch(API + path, init).then(function (response) {
      var date = response.headers.get("Date");
      if (date) skew = new Date(date).getTime() - Date.now();
      return response.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
        if (!response.ok) {
          var detail = data && data.detail;
          if (typeof detail !== "string") detail = response.status + " " + response.statusText;
          if (response.status === 401) detail = "Your Airflow session has ended: log in again. (" + detail + ")";
          throw new ApiError(response.status, detail, data && data.reason);
        }
        return data;
      });
    });
  }

  function flash(message, kind) {
    var box = $("flash");
    box.textContent = message;
    box.className = "flash " + (kind || "error");
    box.hidden = false;
    if (kind === "ok") {
      clearTimeout(flash.timer);
      flash.timer = setTimeout(function () { box.hidden = true; }, 6000);
    }
  }

  function failed(error) { flash(error.message || String(error), "error"); }

  function when(iso) {
    if (!iso) return "–";
    var at = new Date(iso);
    return at.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  }

  function ago(iso) {
    var seconds = Math.max(0, Math.round((Date.now() + skew - new Date(iso).getTime()) / 1000));
    if (seconds < 120) return seconds + " s ago";
    if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
  }

  function badge(text, kind) { return el("span", { class: "badge " + kind, text: text }); }

  function chips(items) {
    var span = el("span");
    (items || []).forEach(function (item) { span.appendChild(el("span", { class: "chip", text: item })); });
    return span;
  }

  function cell(content, attrs) {
    var td = el("td", attrs || {});
    if (content === null || content === undefined || content === "") td.textContent = "–";
    else if (typeof content === "string" || typeof content === "number") td.textContent = String(content);
    else td.appendChild(content);
    return td;
  }

  function fill(rows, columns, empty) {
    var body = $("rows");
    body.textContent = "";
    if (!rows.length) {
      body.appendChild(el("tr", {}, el("td", { colspan: String(columns), class: "muted", text: empty })));
      return;
    }
    rows.forEach(function (row) { body.appendChild(row); });
  }

  // One confirmation dialog for every action; resolves with the reason (or "") or null.
  function confirmAction(options) {
    var dialog = $("confirm");
    $("confirm-title").textContent = options.title;
    $("confirm-text").textContent = options.text;
    $("confirm-reason-label").hidden = !options.reason;
    $("confirm-reason").value = "";
    $("confirm-ok").textContent = options.button;
    $("confirm-ok").className = "btn " + (options.danger ? "btn-danger" : "btn-primary");
    dialog.returnValue = "";
    return new Promise(function (resolve) {
      dialog.addEventListener("close", function closed() {
        dialog.removeEventListener("close", closed);
        resolve(dialog.returnValue === "ok" ? $("confirm-reason").value.trim() : null);
      });
      dialog.showModal();
      if (options.reason) $("confirm-reason").focus();
    });
  }

  function copyFrom(id, button) {
    var source = $(id);
    var text = source.value !== undefined ? source.value : source.textContent;
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { legacyCopy(source); done(); });
    } else {
      legacyCopy(source);
      done();
    }
  }

  function legacyCopy(source) {
    if (source.select) {
      source.select();
    } else {
      var range = document.createRange();
      range.selectNodeContents(source);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
    try { document.execCommand("copy"); } catch (e) { /* the text stays selected for the user */ }
  }

  document.addEventListener("click", function (event) {
    var target = event.target;
    if (!(target instanceof Element)) return;
    if (target.dataset.copy) copyFrom(target.dataset.copy, target);
    if (target.hasAttribute("data-close")) target.closest("dialog").close();
  });

  function taskInstanceUrl(job) {
    var path = AIRFLOW + "/dags/" + encodeURIComponent(job.dag_id) + "/runs/" + encodeURIComponent(job.run_id) +
      "/tasks/" + encodeURIComponent(job.task_id);
    return job.map_index >= 0 ? path + "/mapped/" + job.map_index : path;
  }

  // The new token's fields inside ``box`` (a form, or a part of one).
  function tokenFields(box) {
    var field = function (name) { return box.querySelector("[name=" + name + "]").value.trim(); };
    var days = field("expires_in_days");
    var scopes = Array.prototype.filter.call(box.querySelectorAll("input[name=scopes]"), function (check) {
      return check.checked;
    }).map(function (check) { return check.value; });
    var body = { name: field("name"), scopes: scopes };
    var description = field("description");
    if (description) body.description = description;
    if (days) body.expires_in_days = Number(days);
    if (!body.name || !/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(body.name)) {
      return { error: "Name the token with letters, digits, '.', '_' and '-', starting with a letter or digit." };
    }
    if (days && !(Number.isInteger(Number(days)) && Number(days) >= 1 && Number(days) <= 3650)) {
      return { error: "Expiry is a whole number of days from 1 to 3650, or empty for never." };
    }
    if (!scopes.length) return { error: "Choose at least one scope." };
    return { body: body };
  }

  // Refresh on a timer, but not while a dialog is open: the rows under it stay what the user acts on.
  function every(ms, load) {
    load();
    setInterval(function () { if (!document.hidden && !document.querySelector("dialog[open]")) load(); }, ms);
  }

  // Whether ``data`` differs from what was last shown under ``key``: unchanged rows are not rebuilt,
  // so a refresh never swaps a button out from under the pointer.
  var shown = {};
  function changed(key, data) {
    var text = JSON.stringify(data);
    if (shown[key] === text) return false;
    shown[key] = text;
    return true;
  }

  // -- Agents -------------------------------------------------------------------------------

  var STATUS = { HEALTHY: ["healthy", "ok"], UNHEALTHY: ["unhealthy", "bad"], TERMINATED: ["terminated", "dim"] };

  function agentsPage() {
    var agents = [];
    var tries = [];

    function render() {
      var byAgent = {};
      tries.forEach(function (job) { (byAgent[job.agent_id] = byAgent[job.agent_id] || []).push(job); });
      fill(agents.map(function (agent) {
        var status = STATUS[agent.status] || [agent.status.toLowerCase(), "dim"];
        var statusCell = el("div", {},
          badge(status[0], status[1]),
          agent.draining ? el("span", {}, " ", badge("draining", "warn")) : null,
          el("div", { class: "muted small", "data-heartbeat": agent.last_heartbeat, title: when(agent.last_heartbeat),
            text: "last heartbeat " + ago(agent.last_heartbeat) }));
        var running = el("div");
        (byAgent[agent.id] || []).forEach(function (job) {
          var label = job.dag_id + " › " + job.task_id + (job.map_index >= 0 ? " [" + job.map_index + "]" : "") +
            " (try " + job.try_number + ")";
          running.appendChild(el("div", {}, el("a", { href: taskInstanceUrl(job), target: "_top", text: label }),
            job.state === "LEASED" ? el("span", { class: "muted small", text: " leased" }) : null));
        });
        var cordonCell = agent.cordoned
          ? el("div", { class: "cordon" }, badge("cordoned", "warn"),
            el("div", { text: agent.cordon_reason || "no reason given" }),
            el("div", { class: "muted small", text: "by " + (agent.cordoned_by || "?") + ", " + when(agent.cordoned_at) }))
          : el("span", { class: "muted", text: "no" });
        var row = el("tr", { "data-agent": agent.name },
          cell(el("div", {}, el("b", { text: agent.name }), el("div", { class: "muted small", text: agent.hostname }))),
          cell(chips(agent.roles)),
          cell(statusCell),
          cell(el("div", {}, el("div", { text: "Tether " + agent.tether_version }),
            el("div", { class: "muted small", text: "Airflow Task SDK " + agent.airflow_version }),
            agent.version_support !== "current"
              ? badge(agent.version_support === "supported" ? "upgrade soon" : "unsupported", agent.version_support === "supported" ? "warn" : "bad")
              : null)),
          cell(chips(agent.queues)),
          cell((agent.slots - agent.free_slots) + " / " + agent.slots, { class: "num", "data-slots": "" }),
          cell(running.childNodes.length ? running : null),
          cell(cordonCell, { "data-cordon": "" }));
        if (MAY_CHANGE) {
          var actions = el("td", { class: "actions" });
          if (agent.status !== "TERMINATED") {
            actions.appendChild(agent.cordoned
              ? el("button", { class: "btn btn-sm", type: "button", text: "Uncordon", onclick: function () { uncordon(agent); } })
              : el("button", { class: "btn btn-sm", type: "button", text: "Cordon", onclick: function () { cordon(agent); } }));
            actions.appendChild(el("button", { class: "btn btn-sm", type: "button", text: "Delete", onclick: function () { remove(agent); } }));
          }
          row.appendChild(actions);
        }
        return row;
      }), MAY_CHANGE ? 9 : 8, "No agent has registered yet: register one from “Register a Remote Agent”.");
    }

    function load() {
      return Promise.all([api("GET", "/agents"), api("GET", "/tries-in-flight")]).then(function (answers) {
        agents = answers[0];
        tries = answers[1];
        var beats = agents.map(function (agent) { return Object.assign({}, agent, { last_heartbeat: null }); });
        if (changed("agents", [beats, tries])) {
          render();
        } else {
          agents.forEach(function (agent) {
            var node = document.querySelector("tr[data-agent='" + CSS.escape(agent.name) + "'] [data-heartbeat]");
            if (node) node.setAttribute("data-heartbeat", agent.last_heartbeat);
          });
        }
        $("refreshed").textContent = "Refreshed " + new Date().toLocaleTimeString();
      }, failed);
    }

    function act(promise, message) {
      return promise.then(function () { flash(message, "ok"); return load(); }, failed);
    }

    function cordon(agent) {
      confirmAction({ title: "Cordon " + agent.name + "?", reason: true, button: "Cordon",
        text: "The agent gets no new work; the tasks it runs now finish. It stays cordoned across restarts until uncordoned." })
        .then(function (reason) {
          if (reason === null) return;
          act(api("POST", "/agents/" + encodeURIComponent(agent.id) + "/action", { action: "CORDON", reason: reason || null }),
            agent.name + " is cordoned.");
        });
    }

    function uncordon(agent) {
      confirmAction({ title: "Uncordon " + agent.name + "?", button: "Uncordon", text: "The agent takes new work again." })
        .then(function (answer) {
          if (answer === null) return;
          act(api("POST", "/agents/" + encodeURIComponent(agent.id) + "/action", { action: "UNCORDON" }),
            agent.name + " takes work again.");
        });
    }

    function remove(agent) {
      confirmAction({ title: "Delete " + agent.name + "?", button: "Delete", danger: true,
        text: "Its record is deleted. An agent that is still running registers again, unless its token is revoked." })
        .then(function (answer) {
          if (answer === null) return;
          act(api("DELETE", "/agents/" + encodeURIComponent(agent.id)), agent.name + " is deleted.");
        });
    }

    every(REFRESH_MS, load);
    // "N s ago" moves every second between refreshes.
    setInterval(function () {
      document.querySelectorAll("[data-heartbeat]").forEach(function (node) {
        node.textContent = "last heartbeat " + ago(node.getAttribute("data-heartbeat"));
      });
    }, 1000);
  }

  // -- Tokens -------------------------------------------------------------------------------

  var TOKEN_STATE = { active: "ok", expired: "warn", revoked: "bad" };

  function tokensPage() {
    function load() {
      return api("GET", "/tokens").then(function (tokens) {
        if (!changed("tokens", tokens)) return;
        fill(tokens.map(function (token) {
          var row = el("tr", { "data-token": token.name, "data-token-id": token.id },
            cell(el("b", { text: token.name })),
            cell(el("code", { text: token.token })),
            cell(badge(token.state, TOKEN_STATE[token.state] || "dim"), { "data-state": token.state }),
            cell(chips(token.scopes)),
            cell(el("div", {}, el("div", { text: when(token.created_at) }),
              el("div", { class: "muted small", text: "by " + (token.created_by || "?") }))),
            cell(token.expires_at ? when(token.expires_at) : "never"),
            cell(token.last_used_at ? ago(token.last_used_at) : "never", { title: when(token.last_used_at) }),
            cell(token.description));
          if (MAY_CHANGE) {
            var actions = el("td", { class: "actions" });
            if (token.state === "active") {
              actions.appendChild(el("button", { class: "btn btn-sm", type: "button", text: "Revoke", onclick: function () { revoke(token); } }));
            } else if (token.state === "revoked") {
              actions.appendChild(el("span", { class: "muted small", text: "by " + (token.revoked_by || "?") }));
            }
            row.appendChild(actions);
          }
          return row;
        }), MAY_CHANGE ? 9 : 8, "No agent token yet.");
      }, failed);
    }

    function revoke(token) {
      confirmAction({ title: "Revoke " + token.name + "?", button: "Revoke", danger: true,
        text: "Agents using it are refused within seconds, and the tasks they run are failed. This cannot be undone." })
        .then(function (answer) {
          if (answer === null) return;
          api("POST", "/tokens/" + encodeURIComponent(token.id) + "/revoke").then(function () {
            flash("Token " + token.name + " is revoked.", "ok");
            return load();
          }, failed);
        });
    }

    if (MAY_CHANGE) {
      var dialog = $("token-dialog");
      var form = $("token-form");
      $("new-token").addEventListener("click", function () {
        form.reset();
        form.hidden = false;
        $("token-created").hidden = true;
        $("token-error").hidden = true;
        dialog.showModal();
        form.elements.name.focus();
      });
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        var fields = tokenFields(form);
        if (fields.error) {
          $("token-error").textContent = fields.error;
          $("token-error").hidden = false;
          return;
        }
        api("POST", "/tokens", fields.body).then(function (created) {
          form.hidden = true;
          $("created-name").textContent = created.name;
          $("secret-value").value = created.secret;
          $("token-created").hidden = false;
          $("secret-value").select();
          load();
        }, function (error) {
          $("token-error").textContent = error.message;
          $("token-error").hidden = false;
        });
      });
      // The value leaves the page with the dialog: it is never shown again.
      dialog.addEventListener("close", function () { $("secret-value").value = ""; });
    }
    every(REFRESH_MS * 2, load);
  }

  // -- Allowed IP ranges -----------------------------------------------------------------------

  function ipv4(text) {
    var parts = text.split(".");
    return parts.length === 4 && parts.every(function (part) {
      return /^\d{1,3}$/.test(part) && Number(part) <= 255 && (part === "0" || part[0] !== "0");
    });
  }

  function ipv6(text) {
    if (!/^[0-9A-Fa-f:.]+$/.test(text) || text.indexOf(":::") >= 0) return false;
    var halves = text.split("::");
    if (halves.length > 2) return false;
    var groups = function (half) { return half === "" ? [] : half.split(":"); };
    var all = groups(halves[0]).concat(halves.length === 2 ? groups(halves[1]) : []);
    var count = 0;
    for (var i = 0; i < all.length; i++) {
      var group = all[i];
      if (i === all.length - 1 && group.indexOf(".") >= 0) {
        if (!ipv4(group)) return false;
        count += 2;
      } else if (/^[0-9A-Fa-f]{1,4}$/.test(group)) {
        count += 1;
      } else {
        return false;
      }
    }
    return halves.length === 2 ? count < 8 : count === 8;
  }

  // Why ``text`` is not an IPv4 or IPv6 address or CIDR range, or null when it is one.
  function cidrProblem(text) {
    if (!text) return "Enter an address or a CIDR range, e.g. 203.0.113.0/24 or 2001:db8::/32.";
    var parts = text.split("/");
    if (parts.length > 2) return "“" + text + "” has more than one “/”.";
    var v4 = ipv4(parts[0]);
    if (!v4 && !ipv6(parts[0])) return "“" + parts[0] + "” is not an IPv4 or IPv6 address.";
    if (parts.length === 2) {
      var most = v4 ? 32 : 128;
      if (!/^\d{1,3}$/.test(parts[1]) || Number(parts[1]) > most) {
        return "The prefix length “/" + parts[1] + "” must be a number from 0 to " + most + ".";
      }
    }
    return null;
  }

  function rangesPage() {
    function load() {
      return api("GET", "/allowed-ip-ranges").then(function (answer) {
        if (!changed("ranges", answer)) return;
        $("enforced").textContent = answer.enforced
          ? "Agents may call only from the ranges below; calls from anywhere else are refused."
          : "The list is empty: agents may call from any address.";
        fill(answer.ranges.map(function (range) {
          var row = el("tr", { "data-range": range.cidr },
            cell(el("code", { text: range.cidr })),
            cell(when(range.created_at)),
            cell(range.created_by));
          if (MAY_CHANGE) {
            row.appendChild(el("td", { class: "actions" }, el("button", { class: "btn btn-sm", type: "button", text: "Remove",
              onclick: function () { remove(range.cidr); } })));
          }
          return row;
        }), MAY_CHANGE ? 4 : 3, "No range: any address is allowed.");
      }, failed);
    }

    function remove(cidr) {
      confirmAction({ title: "Remove " + cidr + "?", button: "Remove", danger: true,
        text: "Agents calling from this range are refused from now on, unless another range allows them (or the list becomes empty)." })
        .then(function (answer) {
          if (answer === null) return;
          api("DELETE", "/allowed-ip-ranges/" + cidr.split("/").map(encodeURIComponent).join("/")).then(function () {
            flash(cidr + " is removed.", "ok");
            return load();
          }, failed);
        });
    }

    if (MAY_CHANGE) {
      var form = $("range-form");
      var input = $("cidr");
      var problem = $("cidr-error");
      var show = function (message) {
        problem.textContent = message || "";
        problem.hidden = !message;
        input.setAttribute("aria-invalid", message ? "true" : "false");
      };
      input.addEventListener("input", function () { show(input.value.trim() ? cidrProblem(input.value.trim()) : null); });
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        var cidr = input.value.trim();
        var why = cidrProblem(cidr);
        show(why);
        if (why) return;
        api("POST", "/allowed-ip-ranges", { ranges: [cidr] }).then(function () {
          form.reset();
          flash(cidr + " is allowed.", "ok");
          return load();
        }, function (error) { show(error.message); });
      });
    }
    every(REFRESH_MS * 2, load);
  }

  // -- Register a remote agent -------------------------------------------------------------------

  function registerPage() {
    var form = $("register-form");
    var select = $("token-select");
    var answer = null;

    api("GET", "/tokens").then(function (tokens) {
      select.textContent = "";
      var active = tokens.filter(function (token) { return token.state === "active"; });
      if (!active.length) select.appendChild(el("option", { value: "", text: "No active token: create one" }));
      active.forEach(function (token) {
        select.appendChild(el("option", { value: token.id, text: token.name + " (" + token.token + ", " + token.scopes.join(", ") + ")" }));
      });
      if (!active.length && MAY_CHANGE) form.querySelector("input[name=token_mode][value=new]").click();
    }, failed);

    form.addEventListener("change", function (event) {
      if (event.target.name === "token_mode") $("new-token-fields").hidden = event.target.value !== "new";
    });

    function problem(message) {
      $("register-error").textContent = message;
      $("register-error").hidden = !message;
    }

    function query() {
      var names = ["namespace", "queues", "slots", "agent_token_secret_name", "resource_name_prefix", "secret_backend", "xcom_backend"];
      return names.map(function (name) {
        return encodeURIComponent(name) + "=" + encodeURIComponent(form.elements[name].value.trim());
      }).join("&");
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      problem("");
      var creating = form.querySelector("input[name=token_mode]:checked").value === "new";
      var fields = creating ? tokenFields($("new-token-fields")) : null;
      if (fields && fields.error) { problem(fields.error); return; }
      if (!creating && !select.value) { problem("Choose a token, or create one."); return; }
      var namespace = form.elements.namespace.value.trim();
      var secretName = form.elements.agent_token_secret_name.value.trim();
      // The values first: a new token is made only for a file the chart takes.
      api("GET", "/agent-values?" + query()).then(function (values) {
        var token = creating ? api("POST", "/tokens", fields.body) : Promise.resolve(null);
        return token.then(function (created) {
          answer = values;
          $("new-secret").hidden = !created;
          $("secret-value").value = created ? created.secret : "";
          if (created) {
            // Chosen from now on; the form cannot make the same token twice.
            form.querySelector("input[name=token_mode][value=existing]").click();
            $("new-token-fields").hidden = true;
            select.appendChild(el("option", { value: created.id, text: created.name + " (" + created.token + ")" }));
            select.value = created.id;
          }
          var notes = $("value-notes");
          notes.textContent = "";
          values.warnings.forEach(function (warning) { notes.appendChild(el("li", { text: warning })); });
          values.missing.forEach(function (missing) {
            notes.appendChild(el("li", { text: "Fill in " + missing.name + " in the file: " + missing.hint + "." }));
          });
          var tokenText = created ? created.secret : "<the token>";
          $("commands").textContent = [
            "kubectl create namespace " + namespace,
            "kubectl label namespace " + namespace + " pod-security.kubernetes.io/enforce=restricted",
            "kubectl -n " + namespace + " create secret generic " + secretName + " --from-literal=token=" + tokenText,
            values.helm_install
          ].join("\n");
          $("values-text").textContent = values.text;
          $("result").hidden = false;
          $("result").scrollIntoView({ behavior: "smooth" });
        });
      }).catch(function (error) { problem(error.message); });
    });

    $("download").addEventListener("click", function () {
      if (!answer) return;
      var link = el("a", { href: URL.createObjectURL(new Blob([answer.text], { type: "application/yaml" })), download: "values.yaml" });
      document.body.appendChild(link);
      link.click();
      setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
    });
  }

  // -- Task instance: the Agent tab ---------------------------------------------------------------

  var JOB_STATE = { SUCCESS: "ok", FAILED: "bad", REVOKED: "dim", RUNNING: "warn", LEASED: "warn", QUEUED: "dim" };

  function taskInstancePage() {
    var params = new URLSearchParams(window.location.search);
    var mapIndex = Number(params.get("map_index"));
    var query = "dag_id=" + encodeURIComponent(params.get("dag_id") || "") +
      "&run_id=" + encodeURIComponent(params.get("run_id") || "") +
      "&task_id=" + encodeURIComponent(params.get("task_id") || "") +
      // Airflow leaves {MAP_INDEX} as is for a task instance that is not mapped.
      "&map_index=" + (Number.isInteger(mapIndex) && mapIndex >= 0 ? mapIndex : -1);

    function load() {
      return api("GET", "/task-tries?" + query).then(function (tries) {
        if (!changed("tries", tries)) return;
        fill(tries.map(function (job) {
          return el("tr", { "data-try": String(job.try_number) },
            cell(String(job.try_number), { class: "num" }),
            cell(job.agent_name ? el("b", { text: job.agent_name }) : null),
            cell(badge(job.state.toLowerCase(), JOB_STATE[job.state] || "dim")),
            cell(job.queue),
            cell(when(job.queued_at)),
            cell(when(job.leased_at)),
            cell(job.lease_expires_at ? when(job.lease_expires_at) : null),
            cell(when(job.started_at)),
            cell(when(job.finished_at)),
            cell(job.exit_code === null ? null : String(job.exit_code)),
            cell(job.reason));
        }), 11, "No agent has run this task instance: it did not run on Tether, or its records were cleaned up.");
      }, failed);
    }
    every(REFRESH_MS, load);
  }

  var PAGES = { agents: agentsPage, tokens: tokensPage, "ip-ranges": rangesPage, register: registerPage, "task-instance": taskInstancePage };
  if (PAGES[PAGE]) PAGES[PAGE]();
})();
